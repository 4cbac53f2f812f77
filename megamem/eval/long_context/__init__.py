"""Long-context evaluation, offline: needle-in-a-haystack grids and RULER's synthetic tasks."""
from .runner import TextModel, plot_niah, plot_ruler, ruler_lengths, run_niah, run_ruler, text_model
from .scoring import EFFECTIVE_THRESHOLD, effective_length, string_match_all, string_match_part
from .tasks import NIAH, TASKS, Sample, make_sample

__all__ = ["EFFECTIVE_THRESHOLD", "NIAH", "TASKS", "Sample", "TextModel", "effective_length", "make_sample",
           "plot_niah", "plot_ruler", "ruler_lengths", "run_niah", "run_ruler", "string_match_all",
           "string_match_part", "text_model"]

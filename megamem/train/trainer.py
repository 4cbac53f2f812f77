"""The training loop: one code path for every launcher, ZeRO stage and precision."""
from __future__ import annotations

import math
import os
import signal
import time
from typing import Any, Callable, Dict, Iterable, Optional

import torch

from ..comm import all_reduce, barrier
from ..config import ConfigError, MegamemConfig, dump_config
from ..folders import SAVE_DTYPES, export_model
from ..parallel.checkpointing import set_activation_checkpointing
from ..parallel.distributed import init_distributed
from ..parallel.zero import build_model_for_zero, gathered_state_dict
from .chapter_banks import ChapterBanks, banks_outside_engine
from .checkpoint import CheckpointManager, resolve_resume
from .ds_config import pipeline_stages, resolve_ds_config, zero_stage
from .masking import build_objective
from .diagnostics import MemoryDiagnostics
from .metrics import MetricsLogger, flops_per_token, measure_peak_flops, mfu
from .optim import build_optimizer, build_scheduler, parameter_groups
from .peer_tables import PeerTables, table_parameters, tables_outside_engine
from .run_dir import check_output_dir, check_resume, layout_of, report_changes, truncate_metrics
from .trainable import apply_training_policy, has_lora, plain_state

LoaderFactory = Callable[[str, int, int], Iterable[Dict[str, torch.Tensor]]]  # (split, rank, world) → loader


class NonFiniteLossError(RuntimeError):
    pass


class Trainer:
    def __init__(self, cfg: MegamemConfig, ds_config_path: Optional[str], loaders: LoaderFactory,
                 tokenizer=None, has_eval: bool = True,
                 extra_eval: Optional[Callable[[torch.nn.Module], Dict[str, float]]] = None):
        """extra_eval(model) → more scores for each evaluation (long-context benchmarks), run on rank 0."""
        import deepspeed

        self.cfg, self.t, self.tokenizer, self.loaders, self.has_eval = cfg, cfg.training, tokenizer, loaders, has_eval
        self.extra_eval = extra_eval
        self.rank, self.local_rank, self.world = init_distributed()
        self.ds = resolve_ds_config(ds_config_path, cfg, self.world)
        self.output_dir = self.t.output_dir
        if self.t.num_gpus is not None and self.t.num_gpus != self.world:
            raise ConfigError(f"training.num_gpus = {self.t.num_gpus} but the launcher started {self.world} "
                              f"rank{'s' if self.world > 1 else ''}; launch {self.t.num_gpus} (deepspeed --num_gpus, "
                              "torchrun --nproc_per_node, sbatch) or remove the key: the launcher decides")
        check_output_dir(cfg)  # before anything is written: never land on another run
        self.layout = layout_of(self.ds, cfg, self.world)
        self.pipeline = pipeline_stages(self.ds) > 1
        # the batch transform of the objective (masking.py); its mask token is resolved before any model is built
        self.objective = build_objective(cfg, tokenizer, self.rank)
        # data-parallel position: a pipeline's stages all read the same batches
        self.data_rank, self.data_world = self.rank, self.world
        if self.pipeline:
            from ..parallel.pipeline import build_pipeline_model

            model = build_pipeline_model(cfg, self.ds, self.t.seed)  # the plain model's weights, cut into stages
            grid = model.mpu()
            self.data_rank, self.data_world = grid.get_data_parallel_rank(), grid.get_data_parallel_world_size()
        else:
            model = build_model_for_zero(cfg, self.ds, zero_stage(self.ds), self.t.seed)  # same weights on every rank
            set_activation_checkpointing(model, self.t.gradient_checkpointing)
        if self.t.init_from:  # weights only, e.g. a pipeline run continued on another layout
            from .init_from import init_from

            init_from(model, cfg, zero_stage(self.ds))
        if not self.pipeline:  # LoRA and freezing (train/trainable.py); pipelines refuse them in layout_problems
            apply_training_policy(model, cfg, self.t.seed)
        if self.t.mixed_precision == "fp8":  # torchao float8 linears (float8.py); refused off CUDA ≥ 8.9 already
            from .float8 import convert_to_float8

            convert_to_float8(model, self.t.fp8_recipe)
        self.train_loader = loaders("train", self.data_rank, self.data_world)
        self.eval_loader = None
        self.total_steps = self._total_steps()
        outside = banks_outside_engine(cfg)  # chapter banks: expert shards or row-sparse (chapter_banks.py)
        # PEER expert tables with row-sparse gradients: also outside the engine (peer_tables.py)
        tables = table_parameters(model) if tables_outside_engine(cfg) else []
        self.groups = parameter_groups(model, self.t, exclude=[*(model.banks.parameters() if outside else ()), *tables])
        optimizer = build_optimizer(self.groups, self.t)
        scheduler = build_scheduler(optimizer, self.t, self.total_steps)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds, dist_init_required=False)
        self.model = model
        if extra_eval is not None and (self.pipeline or zero_stage(self.ds) == 3):
            raise ConfigError("training.eval_long_context needs the whole model on rank 0: not with ZeRO-3 or "
                              "pipeline parallelism; evaluate the exports with scripts/eval.py instead")
        # DeepSpeed reports no gradient norm for ZeRO-0 without bf16/fp16 (plain fp32 optimizer): megamem measures it
        self.own_grad_norm = (zero_stage(self.ds) == 0 and not self.pipeline
                              and not (self.ds.get("bf16", {}).get("enabled") or self.ds.get("fp16", {}).get("enabled")))
        self.grad_norm: Optional[float] = None
        self.banks = ChapterBanks(model, cfg, self.rank) if outside else None
        self.diagnostics = MemoryDiagnostics(model, self.pipeline, self.rank, cfg)  # memory layers, on logging steps
        self.tables = PeerTables(model, cfg, self.rank) if tables else None
        self.ckpt = CheckpointManager(self.output_dir, self.rank, self.world, self.t.save_total_limit)
        self.step, self.best_eval, self.bad_evals, self.skipped = 0, float("inf"), 0, 0
        self.stop_requested = False  # set by SIGUSR1 (e.g. SLURM --signal before the time limit)
        if hasattr(signal, "SIGUSR1"):
            signal.signal(signal.SIGUSR1, self._request_stop)
        if self.t.resume_from_checkpoint:
            self._resume(self.t.resume_from_checkpoint)
        elif self.t.init_data_from:
            self._continue_data(self.t.init_data_from)
        t = self.t
        self.tokens_per_step = t.batch_size * t.max_length * t.gradient_accumulation_steps * self.data_world
        self.flops_per_token = flops_per_token(model, self.t.max_length, self.t.batch_size)
        self.peak_flops = measure_peak_flops(torch.bfloat16 if self.t.mixed_precision in ("bf16", "fp8") else torch.float32,
                                             megamem_kernels=cfg.model.base_model_name is None)

    def _request_stop(self, *_) -> None:
        self.stop_requested = True

    def _total_steps(self) -> int:
        if self.t.num_epochs is None:
            return self.t.max_steps
        n = getattr(self.train_loader, "num_batches", None)
        if not n:
            raise ConfigError("training.num_epochs needs data of known length (pre-tokenized shards or local files); "
                              "for streaming data set num_epochs: null and use max_steps")
        return math.ceil(n * self.t.num_epochs / self.t.gradient_accumulation_steps)

    # ------------------------------------------------------------------ state
    def _run_state(self) -> Dict[str, Any]:
        return {"step": self.step, "data": self.train_loader.state_dict(), "best_eval": self.best_eval,
                "bad_evals": self.bad_evals, "skipped": self.skipped, "layout": self.layout}

    def _resume(self, where: str) -> None:
        ckpt_dir, tag = resolve_resume(where, self.output_dir)
        changed = check_resume(self.cfg, os.path.join(ckpt_dir, tag), self.ckpt.run_state(ckpt_dir, tag),
                               self.layout, self.total_steps)
        state = self.ckpt.load(self.engine, ckpt_dir, tag)
        report_changes(changed, state["step"], self.rank)
        if self.rank == 0:  # steps after the checkpoint are redone: their old records go
            truncate_metrics(self.output_dir, state["step"])
        if self.banks is not None:
            self.banks.load(os.path.join(ckpt_dir, tag))
        if self.tables is not None:
            self.tables.load(os.path.join(ckpt_dir, tag))
        self.train_loader.load_state_dict(state["data"])
        self.step, self.best_eval = state["step"], state["best_eval"]
        self.bad_evals, self.skipped = state["bad_evals"], state["skipped"]

    def _continue_data(self, where: str) -> None:
        """training.init_data_from: this rank's data position from another run's checkpoint, nothing else (a
        progressive phase reads on where the previous phase stopped instead of re-reading its batches)."""
        ckpt_dir, tag = resolve_resume(where, self.output_dir, key="training.init_data_from")
        state = self.ckpt.run_state(ckpt_dir, tag)
        if state["world_size"] != self.world:
            raise ConfigError(f"training.init_data_from: {os.path.join(ckpt_dir, tag)} was written by "
                              f"{state['world_size']} ranks, this run has {self.world}: the data position is per rank")
        self.train_loader.load_state_dict(state["data"])

    def save(self, best: bool = False) -> str:
        return self.ckpt.save(self.engine, self.step, self._run_state(), dump_config(self.cfg), self.tokenizer, best,
                              write_extra=self._write_extra if (self.banks, self.tables) != (None, None) else None)

    def _write_extra(self, path: str) -> None:
        """What trains outside the engine: chapter banks, PEER tables."""
        for part in (self.banks, self.tables):
            if part is not None:
                part.save(path)

    # --------------------------------------------------------------- helpers
    def _all_reduce(self, values: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return all_reduce(values, op) if self.world > 1 else values

    def _forward(self, batch: Dict[str, torch.Tensor]):
        if self.pipeline:  # evaluation only: the LM loss, from the last stage, on every rank
            from ..model import CausalLMOutput
            from ..parallel.pipeline import pipe_batch

            return CausalLMOutput(None, self.engine.eval_batch(iter([pipe_batch(batch)]), num_micro_batches=1))
        kwargs = {k: v.to(self.engine.device) for k, v in batch.items() if k not in ("input_ids",)}
        return self.engine(batch["input_ids"].to(self.engine.device), **kwargs)

    def _engine_grad_norm(self) -> float:
        """Global L2 norm of the engine's (already all-reduced, unclipped) gradients: DeepSpeed reports none
        for ZeRO-0 in fp32, where every rank holds whole gradients."""
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads).item()

    def _lr_factor(self) -> float:
        return self.scheduler.get_last_lr()[0] / self.scheduler.base_lrs[0]

    # ------------------------------------------------------------------ train
    def train_step(self, batches) -> Dict[str, float]:
        """One optimizer step over gradient_accumulation_steps micro-batches; non-finite ones are skipped."""
        if self.pipeline:
            return self._pipeline_step(batches)
        losses, aux, micro, in_a_row, fractions = [], {}, 0, 0, []
        diagnose = self.diagnostics.begin(self._logging_step(self.step + 1))
        while micro < self.t.gradient_accumulation_steps:
            batch, fraction = self.objective.train_batch(next(batches), self.step, micro, self.skipped)
            out = self._forward(batch)
            loss = out.loss + sum(out.aux_losses.values()) if out.aux_losses else out.loss
            finite = self._all_reduce(torch.tensor([float(torch.isfinite(loss.detach()).all())]), "min")
            if finite.item() == 0:  # any rank: skip this micro-batch everywhere (no backward), count it
                self.skipped += 1
                in_a_row += 1
                if in_a_row >= self.t.max_nonfinite_steps:
                    raise NonFiniteLossError(
                        f"loss was NaN/inf on {in_a_row} micro-batches in a row at step {self.step + 1}; stopping. "
                        "Lower the learning rate, check the data, or use bf16/fp32")
                continue
            in_a_row = 0
            if diagnose:
                self.diagnostics.after_forward()
            self.engine.backward(loss)
            if diagnose and self.engine.is_gradient_accumulation_boundary():
                self.diagnostics.before_step()
            # the banks outside the engine step with the learning rate the engine's schedule gives this step
            outside = self.banks is not None or self.tables is not None
            bank_lr = self._lr_factor() if outside and self.engine.is_gradient_accumulation_boundary() else None
            if self.own_grad_norm and self.engine.is_gradient_accumulation_boundary():
                self.grad_norm = self._engine_grad_norm()
            self.engine.step()
            if bank_lr is not None:
                for part in (self.banks, self.tables):
                    if part is not None:
                        part.step(bank_lr)
            micro += 1
            fractions.append(fraction)
            losses.append(out.loss.detach().float())
            for name, value in out.aux_losses.items():
                aux[name] = aux.get(name, 0.0) + value.detach().float() / self.t.gradient_accumulation_steps
        lm = self._all_reduce(torch.stack(losses).mean().reshape(1)).item() / self.world
        record = {"lm_loss": lm, **{k: self._all_reduce(v.reshape(1)).item() / self.world for k, v in aux.items()}}
        record["loss"] = lm + sum(v for k, v in record.items() if k != "lm_loss")
        if self.objective.fraction_logged:  # masked denoising: the mean mask fraction of the step's micro-batches
            record["mask_fraction"] = self._all_reduce(torch.tensor([sum(fractions) / len(fractions)],
                                                                    dtype=torch.float64)).item() / self.world
        if diagnose:
            record.update(self.diagnostics.end(self._all_reduce, self.world))
        return record

    def _logging_step(self, step: int) -> bool:
        return step % self.t.logging_steps == 0 or step == self.total_steps

    def _pipeline_step(self, batches) -> Dict[str, float]:
        """DeepSpeed's pipeline schedule runs the micro-batches; router losses arrive per name from the last stage."""
        from ..parallel.pipeline import pipe_batch

        loss = self.engine.train_batch(map(pipe_batch, batches)).item()
        if not math.isfinite(loss):  # the schedule has no per-micro-batch skip: stop instead
            raise NonFiniteLossError(f"loss was NaN/inf at step {self.step + 1} of a pipeline run (micro-batches "
                                     "cannot be skipped there); stopping. Lower the learning rate or check the data")
        record = {k: v.item() for k, v in self.engine.agg_additional_losses.items()}
        record["loss"] = record["lm_loss"] + sum(v for k, v in record.items() if k != "lm_loss")
        return record

    @torch.no_grad()
    def evaluate(self) -> Optional[Dict[str, float]]:
        if not self.has_eval:
            return None
        self.engine.eval()
        if self.eval_loader is None:
            self.eval_loader = self.loaders("eval", self.data_rank, self.data_world)
        it = iter(self.eval_loader)  # each iter() is one pass over the eval split
        total = torch.zeros(4, dtype=torch.float64)  # loss·tokens, tokens, mask fractions, batches
        for i in range(self.t.eval_max_batches or 2**62):
            batch = next(it, None)
            # every rank runs the same number of forwards (ZeRO-3 gathers are collective)
            if self._all_reduce(torch.tensor([0.0 if batch is None else 1.0]), "min").item() == 0:
                break
            batch, fraction = self.objective.eval_batch(batch, i)
            out = self._forward(batch)
            n = self.objective.scored(batch["labels"])
            total += torch.tensor([out.loss.item() * n, n, fraction or 0.0, 1], dtype=torch.float64)
        self.engine.train()
        total = self._all_reduce(total) / (self.world // self.data_world)  # each pipeline stage counted it
        if total[1] == 0:
            return None
        loss = (total[0] / total[1]).item()
        result = {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50)), "eval_tokens": int(total[1])}
        if self.objective.fraction_logged:
            result["eval_mask_fraction"] = (total[2] / total[3]).item()
        if self.extra_eval is not None:  # rank 0 alone (checked in __init__: the model is whole on each rank)
            if self.rank == 0:
                self.engine.eval()
                result.update(self.extra_eval(self.engine.module))
                self.engine.train()
            barrier()
        return result

    def fit(self) -> Dict[str, Any]:
        log = MetricsLogger(self.cfg, self.output_dir, self.rank, self.total_steps, self.step)
        batches = iter(self.train_loader)
        self.engine.train()
        last_eval, history, stop, preempted = None, [], False, False
        try:
            while self.step < self.total_steps and not stop:
                start = time.perf_counter()
                record = self.train_step(batches)
                self.step += 1
                elapsed = time.perf_counter() - start
                history.append(record["loss"])
                log.step(record["loss"])
                if self._logging_step(self.step):
                    log.log(self._train_record(record, elapsed))
                self._log_expert_usage(log)
                saved = False
                if self.t.eval_steps and self.step % self.t.eval_steps == 0 or self.step == self.total_steps:
                    last_eval = self.evaluate()
                    stop, saved = self._after_eval(last_eval, log)
                # a stop request on any rank stops every rank after this step, with a checkpoint
                preempted = self._all_reduce(torch.tensor([float(self.stop_requested)])).item() > 0
                stop = stop or preempted
                if not saved and (self.step % self.t.save_steps == 0 or self.step == self.total_steps or stop):
                    self.save()
            if not preempted:
                self.export(os.path.join(self.output_dir, "final"))
        finally:
            log.close()
            for loader in (self.train_loader, self.eval_loader):
                if hasattr(loader, "close"):
                    loader.close()
        return {"steps": self.step, "train_losses": history, "eval": last_eval, "skipped_nonfinite": self.skipped,
                "preempted": preempted}

    def _train_record(self, record: Dict[str, float], elapsed: float) -> Dict[str, Any]:
        tps = self.tokens_per_step / elapsed
        lrs = {f"lr_{g['name']}": g["lr"] for g in self.optimizer.param_groups if "name" in g}
        grad_norm = self.grad_norm if self.own_grad_norm else self.engine.get_global_grad_norm()
        return {"kind": "train", "step": self.step, **record, "lr": self.optimizer.param_groups[0]["lr"], **lrs,
                "grad_norm": float(grad_norm) if grad_norm is not None else None, "tokens_per_s": tps,
                "mfu": mfu(tps, self.flops_per_token, self.peak_flops, self.world), "step_time_s": elapsed,
                "skipped_nonfinite": self.skipped}

    def _log_expert_usage(self, log: MetricsLogger) -> None:
        """Every peer_config.log_freq steps: each PEER layer's usage in the last forward, counts summed over
        ranks (not for pipelines, whose stages hold different layers)."""
        m = self.cfg.model
        if not (m.use_peer and m.peer_config.log_expert_usage) or self.pipeline or self.step % m.peer_config.log_freq:
            return
        from ..model.mlp.peer import peer_modules, usage_stats

        record = {"kind": "experts", "step": self.step}
        for layer, peer in sorted(peer_modules(self.model).items()):
            counts = self._all_reduce(peer.expert_counts.detach().to(torch.float64).cpu())
            stats = usage_stats(counts, m.peer_config.usage_threshold)
            record.update({f"peer{layer}_{name}": value for name, value in stats.items()})
        log.log(record)

    def _after_eval(self, result: Optional[Dict[str, float]], log: MetricsLogger) -> tuple:
        """Log, track the best eval loss, save the best checkpoint, decide early stopping."""
        if result is None:
            return False, False
        log.log({"kind": "eval", "step": self.step, **result})
        improved = result["eval_loss"] < self.best_eval - self.t.early_stopping_threshold
        saved = False
        if improved:
            self.best_eval, self.bad_evals = result["eval_loss"], 0
            if self.t.save_best_model:
                self.save(best=True)
                saved = True
        else:
            self.bad_evals += 1
        return self.t.early_stopping and self.bad_evals >= self.t.early_stopping_patience, saved

    def export(self, path: str) -> None:
        """Final weights: the whole model, or for adapter runs only what trained (megamem.adapter.saving)."""
        names = self.model.export_names() if hasattr(self.model, "export_names") else None
        if self.pipeline:
            from ..parallel.pipeline import gathered_plain_state_dict

            state = gathered_plain_state_dict(self.model, SAVE_DTYPES[self.t.save_precision], self.rank)
        elif names is None and has_lora(self.model):  # from scratch with LoRA: merged in fp32, stored at save_precision
            state = gathered_state_dict(self.model, torch.float32, self.rank)  # empty on ranks > 0: nothing to merge
            state = {k: v.to(SAVE_DTYPES[self.t.save_precision]) if v.is_floating_point() else v
                     for k, v in (plain_state(state, self.model) if self.rank == 0 else state).items()}
        else:
            state = gathered_state_dict(self.model, SAVE_DTYPES[self.t.save_precision], self.rank, names)
        if self.banks is not None:  # expert-parallel shards → whole banks
            self.banks.full_banks(state, SAVE_DTYPES[self.t.save_precision])
        if self.rank == 0 and names is not None:
            from ..adapter.saving import export_adapter

            export_adapter(state, self.cfg, self.tokenizer, path, self.step)
        elif self.rank == 0:
            export_model(state, self.cfg, self.tokenizer, path, self.step)
        barrier()


__all__ = ["Trainer", "NonFiniteLossError"]

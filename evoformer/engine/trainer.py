"""The training loop: one readable place from config to trained checkpoint.

The trainer builds the pieces (layout, data, model, optimizer, logging), restores a checkpoint
when asked, then runs steps of gradient accumulation over the rank's micro-batches. Everything
that decides a step's numbers (data indices, learning rate, RNG) is a function of the seed and
the step, which is what makes resume bit-exact and results independent of the dp size.

Parallel layout: the process groups are built once (``ParallelDims.build``) and passed down;
``engine.parallelize`` builds the model and makes it distributed, in one readable order. The
ranks of one model-parallel group read the same micro-batches. How the data-parallel replicas
cooperate (DDP, FSDP2, DeepSpeed), precision, backward, clipping, the optimizer step and
checkpoint state belong to the strategy (``engine.strategy``); how a step's micro-batches run
through the model (all layers here, or pipeline stages) to the step runner (``engine.runner``).
The loop below branches on neither.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from evoformer.checkpoint import (
    WEIGHTS_ONLY,
    list_checkpoints,
    read_trainer_state,
    resolve_checkpoint,
    write_text_atomic,
)
from evoformer.checkpoint.tokenizer import copy_tokenizer
from evoformer.config import Config, to_yaml
from evoformer.config.schema import ParallelConfig
from evoformer.data import EvalBatches, GlobalBatchSampler, build_datasets, get_batch
from evoformer.data.dataset import WindowDataset
from evoformer.data.prefetch import Prefetcher
from evoformer.data.sampler import BatchSchedule, BlendedSampler
from evoformer.distributed import ParallelDims, init_process_group, pick_device
from evoformer.engine.checkpointing import Checkpointer
from evoformer.engine.memory import MemoryMeter
from evoformer.engine.metrics import MetricsLogger, NullLogger, truncate_metrics
from evoformer.engine.optim import lr_at
from evoformer.engine.parallelize import parallelize
from evoformer.engine.profile import StepProfiler
from evoformer.engine.resume import check_resume
from evoformer.engine.runtime import tune_glibc_malloc
from evoformer.engine.throughput import device_peak, throughput
from evoformer.engine.watchdog import Watchdog, hang_error, is_collective_failure
from evoformer.errors import TrainingDiverged, UserError
from evoformer.model.costs import train_flops_per_token


@dataclasses.dataclass
class TrainResult:
    """What a finished (or interrupted) run reports back."""

    step: int
    losses: dict[int, float]
    val_losses: dict[int, float]
    interrupted: bool
    output_dir: Path


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop saves a checkpoint and exits at the next step boundary."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        # SIGUSR1: the scheduler's early warning before a time limit (sbatch --signal).
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means now
        self.signal = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    """Builds a run from a Config and trains it; ``Trainer(cfg).train()``."""

    def __init__(self, cfg: Config, step_hook: Callable[[int, Trainer], None] | None = None):
        self.cfg = cfg
        self.step_hook = step_hook
        self.dims = ParallelDims.from_env(cfg.parallel)
        self.device = pick_device(cfg.run.device, self.dims)
        if cfg.model.backend == "te":  # fail before any data preparation, with one line
            from evoformer.parallel.te_backend import import_te

            import_te()
        if self.device.type == "cuda" and self.dims.distributed and cfg.dist.flight_recorder:
            # NCCL's flight recorder dumps here on a timeout (distributed.nccl_environment)
            (Path(cfg.run.output_dir) / "flight_recorder").mkdir(parents=True, exist_ok=True)
        init_process_group(self.dims, self.device, cfg.dist, cfg.run.output_dir)
        self.groups = self.dims.build(self.device.type)
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        if cfg.run.tune_malloc and self.device.type == "cpu":
            tune_glibc_malloc()
        t = cfg.train
        if t.global_batch_size % (self.dims.dp * t.micro_batch_size):
            raise UserError(
                f"config: train.global_batch_size={t.global_batch_size} must be divisible by "
                f"dp * micro_batch_size = {self.dims.dp} * {t.micro_batch_size}"
            )
        self.grad_accum = t.global_batch_size // (self.dims.dp * t.micro_batch_size)
        self.out_dir = Path(cfg.run.output_dir)
        self.ckpt_root = self.out_dir / "checkpoints"
        self.resume_from = self._resolve_resume()
        # checkpoint.init_from: a new run from those weights, until it has checkpoints of its own
        self.init_from: Path | None = None
        if cfg.checkpoint.init_from and self.resume_from is None:
            self.init_from = resolve_checkpoint(cfg.checkpoint.init_from)
        # Before any data or model is built: a resume that would change the model or the data
        # order is refused; the other changed settings are reported when training starts.
        self.resume_changes: list[str] = []
        self.resume_step = 0
        self.config_file = self.out_dir / "config.yaml"  # where this run's settings are
        if self.resume_from is not None:
            state = read_trainer_state(self.resume_from)
            if not state.get(WEIGHTS_ONLY):  # weights only: a new run from those weights
                self.resume_changes = check_resume(self.resume_from, cfg)
                self.resume_step = int(state.get("step", 0))

        log = print if self.dims.is_main else (lambda *a, **k: None)
        self.data = build_datasets(cfg.data, t.seq_len, cfg.run.seed, cfg.model.vocab_size, log=log)
        self.sampler = self._build_sampler()
        # The next steps' micro-batches are read on a thread while this one trains.
        self.prefetcher = Prefetcher(
            self._read_step, cfg.data.prefetch, pin=self.device.type == "cuda"
        )

        # Weights come from per-tensor generators (build_model); the global RNG drives dropout.
        # It differs per data-parallel rank, so replicas drop different units, and is the same
        # on the ranks of one TP group, which must drop the same units of replicated tensors.
        torch.manual_seed(cfg.run.seed * 1_000_003 + self.dims.dp_rank)
        # The model, made distributed in one readable order (engine.parallelize).
        document_eod = None
        if cfg.data.document_masking:
            document_eod = self.data.train.eod_id
            if document_eod is None:
                raise UserError(
                    f"data.document_masking needs documents: data.source={cfg.data.source} has "
                    "no end-of-document tokens (use data.source=default or files)"
                )
        parallel = parallelize(
            cfg, self.dims, self.groups, self.device, self.grad_accum, document_eod
        )
        self.model, self.strategy, self.runner = parallel.model, parallel.strategy, parallel.runner
        # Measures the first step (engine.memory); the numbers go on every metrics line.
        self.memory = MemoryMeter(self.device, enabled=cfg.run.measure_memory, compiled=t.compile)
        self.step = 0
        # Set by _restore for a checkpoint of weights only (trainer.json "weights_only").
        self.weights_only = False
        # Steps not applied: non-finite in a row (the run stops past the patience), in total,
        # and loss spikes; the recent finite losses the spike test compares with.
        self.nonfinite_streak = 0
        self.last_skip: str | None = None
        self.skips = {"nonfinite": 0, "spike": 0}
        self.recent_losses: collections.deque[float] = collections.deque(maxlen=t.spike_window)
        self.stop = StopFlag()
        self.logger: MetricsLogger | NullLogger = NullLogger()
        # MFU: the config's model FLOPs per token against the device's peak (engine.throughput)
        self.flops_per_token = train_flops_per_token(cfg.model, t.seq_len)
        self.peak_flops, self.peak_source = device_peak(
            self.device, cfg.precision, cfg.fp8.enabled, cfg.run.peak_tflops
        )
        # Saves, foreground or background (engine.checkpointing); logs through self.logger.
        self.checkpointer = Checkpointer(
            self.strategy, self.ckpt_root, cfg.checkpoint, lambda line: self.logger.info(line)
        )
        self.watchdog = Watchdog(
            cfg.dist.timeout_s, self.dims.rank, self.checkpointer.note, self._on_hang
        )
        self.profiler = StepProfiler(cfg.run.profile, self.out_dir / "profile", self.dims.rank)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        opt = self.strategy.optimizer
        assert opt is not None  # built by strategy.setup, inside parallelize()
        return opt

    # -- setup -------------------------------------------------------------------------------

    def _build_sampler(self) -> GlobalBatchSampler:
        """The step -> samples order: uniform over the data, or a blend of the sources."""
        t = self.cfg.train
        g, seed = t.global_batch_size, self.cfg.run.seed
        sources = self.data.sources
        if sources:
            return BlendedSampler(
                [s.samples for s in sources], [s.weight for s in sources], g, seed
            )
        ramp = None
        if t.batch_ramp:  # [start, increment, tokens] -> samples of train.seq_len windows
            start, inc, tokens = t.batch_ramp
            ramp = (start, inc, max(1, tokens // t.seq_len))
        schedule = BatchSchedule(g, ramp)
        for size in schedule.sizes():
            if size % (self.dims.dp * t.micro_batch_size):
                raise UserError(
                    f"config: train.batch_ramp={list(t.batch_ramp)}: a global batch of {size} "
                    f"does not divide into dp * micro_batch_size = {self.dims.dp} * "
                    f"{t.micro_batch_size}"
                )
        return GlobalBatchSampler(len(self.data.train), g, seed, schedule)

    def seq_len_at(self, step: int) -> int:
        """The training sequence length of ``step`` (0-based): ``train.seq_len``, or the
        ``train.seq_len_schedule`` entry in force."""
        length = self.cfg.train.seq_len
        for first, n in self.cfg.train.seq_len_schedule:
            if step >= first:
                length = n
        return length

    def _flops_per_token(self, seq_len: int) -> float:
        if seq_len == self.cfg.train.seq_len:
            return self.flops_per_token
        return train_flops_per_token(self.cfg.model, seq_len)

    def _ramps(self, step: int, seq_len: int) -> dict[str, int]:
        """The global batch (sequences) and seq_len of ``step`` when either is scheduled."""
        t = self.cfg.train
        if not (t.batch_ramp or t.seq_len_schedule):
            return {}
        windows = self.sampler.schedule.size(step)
        return {"batch_size": windows * (t.seq_len // seq_len), "seq_len": seq_len}

    def _peak_memory(self) -> dict[str, float]:
        """GPU: the peak allocated memory of this device since the last metrics line (GiB)."""
        if self.device.type != "cuda":
            return {}
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30
        torch.cuda.reset_peak_memory_stats(self.device)
        return {"mem_peak_gib": peak}

    def _read_step(self, step: int) -> list[torch.Tensor]:
        """This rank's micro-batches of ``step`` ([B, T+1] token windows, on the host)."""
        d, mbs = self.dims, self.cfg.train.micro_batch_size
        micro = self.sampler.micro_batches(step, d.dp_rank, d.dp, mbs)
        batches = [get_batch(self.data.train, ix) for ix in micro]
        n = self.seq_len_at(step)
        if n == self.cfg.train.seq_len:
            return batches
        # sequence-length warmup: each window of seq_len + 1 tokens becomes seq_len / n windows
        # of n + 1 (overlapping by one token, as consecutive windows do): the same targets
        return [b.unfold(1, n + 1, n).reshape(-1, n + 1) for b in batches]

    def _source_tokens(self, step: int) -> dict[str, int]:
        """Tokens seen from each blend source by the steps before ``step`` (metrics)."""
        if not isinstance(self.sampler, BlendedSampler):
            return {}
        counts = self.sampler.counts_before(step)
        seq = self.cfg.train.seq_len
        return {f"tokens/{s.name}": int(c) * seq for s, c in zip(self.data.sources, counts)}

    def _resolve_resume(self) -> Path | None:
        load = self.cfg.checkpoint.load
        if load in (None, "", "none"):
            if list_checkpoints(self.ckpt_root):
                raise UserError(
                    f"run.output_dir={self.out_dir} already holds checkpoints; resume with "
                    "checkpoint.load=auto or choose another run.output_dir"
                )
            return None
        if load == "auto":
            return resolve_checkpoint(self.ckpt_root) if list_checkpoints(self.ckpt_root) else None
        return resolve_checkpoint(load)

    def _prepare_run_dir(self) -> None:
        if self.dims.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._write_config()
            tok = self.data.tokenizer
            if tok is not None:  # tokenizer.model or tokenizer/ (checkpoint.tokenizer)
                copy_tokenizer(tok, self.out_dir)
        self._barrier()

    def _write_config(self) -> None:
        """``config.yaml`` holds the run's first settings and is never replaced once the run has
        checkpoints; a resume with other settings records them as ``config.step_N.yaml``."""
        first = self.out_dir / "config.yaml"
        text = to_yaml(self.cfg)
        if not first.is_file() or not list_checkpoints(self.ckpt_root):
            write_text_atomic(first, text)
            self.config_file = first
        elif self.resume_changes and first.read_text() != text:
            self.config_file = self.out_dir / f"config.step_{self.resume_step}.yaml"
            write_text_atomic(self.config_file, text)

    def _barrier(self) -> None:
        if self.dims.distributed:
            dist.barrier()

    def _restore(self) -> None:
        if self.init_from is not None:
            self.strategy.load_checkpoint(self.init_from, weights_only=True)
            self.weights_only = True
            return
        if self.resume_from is None:
            return
        state = self.strategy.load_checkpoint(self.resume_from)
        # Weights only (an import-hf checkpoint): a new run from those weights, at step 0 with
        # the fresh optimizer and data order, not a resume.
        self.weights_only = bool(state.get(WEIGHTS_ONLY))
        if not self.weights_only:
            self.step = int(state["step"])
            if "sampler" in state:
                self.sampler.load_state_dict(state["sampler"])
            guard = state.get("guard", {})
            self.recent_losses.extend(guard.get("recent_losses", []))
            self.skips.update(guard.get("skips", {}))
        if self.dims.is_main:
            truncate_metrics(self.out_dir / "metrics.jsonl", self.step)

    # -- the loop ----------------------------------------------------------------------------

    def train(self) -> TrainResult:
        cfg, t = self.cfg, self.cfg.train
        self._prepare_run_dir()
        self._restore()
        if self.dims.is_main:
            self.logger = MetricsLogger(
                cfg.run,
                self.out_dir,
                t.max_steps,
                cast(dict, OmegaConf.to_container(OmegaConf.structured(cfg))),  # a mapping
            )
        if self.weights_only:
            self.logger.info(
                f"loaded weights from {self.init_from or self.resume_from} (no optimizer state): "
                "starting at step "
                "0 with a fresh optimizer"
            )
        elif self.resume_from is not None:
            self.logger.info(
                f"resumed from {self.resume_from} at step {self.step} of {t.max_steps}"
            )
            if self.resume_changes:
                self.logger.info(
                    "changed settings: "
                    + ", ".join(self.resume_changes)
                    + f" (recorded in {self.config_file.name})"
                )
            if self.step >= t.max_steps:
                self.logger.info(
                    f"nothing to train: {self.out_dir} finished at step {self.step} "
                    f"(train.max_steps={t.max_steps}); raise train.max_steps to continue it, "
                    "or set another run.output_dir for a new run"
                )
                self.logger.close()
                return TrainResult(self.step, {}, {}, False, self.out_dir)
        self.logger.info(self._banner())
        if self.peak_flops:
            self.logger.info(
                f"mfu against {self.peak_flops / 1e12:.3g} TFLOP/s per device "
                f"({self.peak_source}); {self.flops_per_token / 1e9:.4g} GFLOP per token"
            )
        else:
            self.logger.info(f"mfu not logged: {self.peak_source}")
        self.logger.set_start(self.step)
        self.stop.install()
        if cfg.dist.watchdog:
            self.watchdog.start()
        losses: dict[int, float] = {}
        val_losses: dict[int, float] = {}
        schedule = self.sampler.schedule
        window_start, window_steps, window_wait = time.perf_counter(), 0, 0.0
        window_tokens = 0
        beat = self.watchdog.beat
        try:
            while self.step < t.max_steps:
                lr = lr_at(self.step, t.max_steps, cfg.optim)
                beat(self.step + 1, "the step (forward, backward, gradient collectives, update)")
                self.profiler.before_step(self.step + 1)
                loss, grad_norm, extra = self.train_step(self.step, lr)
                self.profiler.after_step(self.step + 1)
                self._check_divergence(self.step + 1, loss)
                window_tokens += schedule.size(self.step) * t.seq_len
                self.step += 1
                window_steps += 1
                window_wait += self.prefetcher.wait
                losses[self.step] = loss
                if self.step % t.log_every == 0 or self.step in (1, t.max_steps):
                    elapsed = time.perf_counter() - window_start
                    tokens_per_s = window_tokens / max(elapsed, 1e-9)
                    seq_len = self.seq_len_at(self.step - 1)
                    self.logger.log(
                        {
                            "step": self.step,
                            "loss": loss,
                            "lr": lr,
                            "grad_norm": grad_norm,
                            "tokens_per_s": tokens_per_s,
                            **throughput(
                                tokens_per_s,
                                self._flops_per_token(seq_len),
                                self.dims.world_size,
                                self.peak_flops,
                            ),
                            # where the window's time went, per step: all of it, blocked on
                            # batches (prefetch: ~0), saving checkpoints
                            "step_ms": 1e3 * elapsed / window_steps,
                            "data_wait_ms": 1e3 * window_wait / window_steps,
                            **self.checkpointer.metrics(window_steps),
                            **self._peak_memory(),
                            "tokens": schedule.start(self.step) * t.seq_len,
                            **self._ramps(self.step - 1, seq_len),
                            **self._source_tokens(self.step),
                            **extra,
                        }
                    )
                    window_start, window_steps, window_wait = time.perf_counter(), 0, 0.0
                    window_tokens = 0
                if t.eval_every and (self.step % t.eval_every == 0 or self.step == t.max_steps):
                    beat(self.step, "evaluation")
                    val_losses[self.step] = self.evaluate()
                    per_source = {
                        f"val_loss/{s.name}": self.evaluate(s.val)
                        for s in self.data.sources
                        if s.val is not None
                    }
                    self.logger.log(
                        {"step": self.step, "val_loss": val_losses[self.step], **per_source}
                    )
                if self.step_hook is not None:
                    beat(self.step, "the step hook")
                    self.step_hook(self.step, self)
                beat(self.step, "the end-of-step all-reduce (stop flag, background save state)")
                stopping = self._should_stop()
                every = cfg.checkpoint.save_every
                # Never save inside a non-finite streak: the weights may be what went wrong,
                # and keep_last would prune the newest finite checkpoint.
                if ((every and self.step % every == 0) or stopping) and not self.nonfinite_streak:
                    beat(self.step, f"saving checkpoint step_{self.step}")
                    self.save()
                if stopping:
                    beat(self.step, "waiting for the background checkpoint write")
                    self.checkpointer.finish()
                    self._write_status("interrupted")  # first: the launcher acts on it
                    self.logger.info(
                        f"stopped by signal at step {self.step}; checkpoint saved, resume with "
                        "checkpoint.load=auto"
                    )
                    return TrainResult(self.step, losses, val_losses, True, self.out_dir)
            if cfg.checkpoint.save_final and not self._saved_at(self.step):
                if not self.nonfinite_streak:
                    beat(self.step, f"saving checkpoint step_{self.step}")
                    self.save()
            beat(self.step, "waiting for the background checkpoint write")
            self.checkpointer.finish()  # the run ends with every checkpoint committed
        except UserError:
            raise
        except Exception as err:
            if not (self.dims.distributed and is_collective_failure(err)):
                raise
            self._write_status("hung")
            w, note = self.watchdog, self.checkpointer.note()
            raise hang_error(err, self.dims.rank, w.step, w.phase, note) from None
        finally:
            self.watchdog.stop()
            self.profiler.close()
            self.prefetcher.close()
            self.stop.restore()
            self.logger.close()
        self._write_status("finished")
        return TrainResult(self.step, losses, val_losses, False, self.out_dir)

    def _on_hang(self, line: str) -> None:
        """The watchdog fired (its thread; the process ends next): record it for launchers."""
        self._write_status("hung")

    def _write_status(self, state: str) -> None:
        """``status.json`` tells a launcher whether to requeue: finished or interrupted."""
        if self.dims.is_main:
            write_text_atomic(
                self.out_dir / "status.json",
                json.dumps(
                    {"state": state, "step": self.step, "max_steps": self.cfg.train.max_steps}
                ),
            )

    def train_step(self, step: int, lr: float) -> tuple[float, float, dict[str, float]]:
        """One optimizer step over this rank's micro-batches.

        Returns the mean next-token loss (``ce_loss``, comparable across architectures), the
        gradient norm, and the means of the other loss terms (MoE aux, MTP) when present."""
        strategy = self.strategy
        # pinned on a GPU, so the copies run asynchronously
        batches = [b.to(self.device, non_blocking=True) for b in self.prefetcher.get(step)]
        sums = self.runner.forward_backward(batches, self.memory)
        names = sorted(sums)
        stacked = torch.stack([sums[n] for n in names])
        if self.dims.replicas > 1:  # already the same on the ranks of a TP group; dp x cp
            dist.all_reduce(stacked, op=dist.ReduceOp.AVG, group=self.groups.dp_group)
        self.memory.after_backward(strategy)  # gradients at their peak
        terms = dict(zip(names, stacked.tolist()))  # the same on every rank
        reason = self._skip_reason(terms)
        result = strategy.step(lr, self.cfg.optim.grad_clip, skip=reason is not None)
        if result.nonfinite:
            reason = reason or "nonfinite"  # the gradients
            self.skips[reason] += 1
        elif reason is None:
            self.recent_losses.append(terms["ce_loss"])
        self.last_skip = reason if result.nonfinite else None
        values = {**terms, **result.metrics}
        if any(self.skips.values()):
            values.update({f"skipped_{k}": float(v) for k, v in self.skips.items()})
        if self.cfg.run.measure_memory:
            values.update(self.memory.after_step(strategy))
        # Modules with per-step state (MoE load statistics, aux-loss-free router biases) see the
        # whole step's micro-batches before they update and report.
        values.update(self.runner.end_of_step())
        loss = values.pop("ce_loss")
        return loss, result.grad_norm, values

    def _skip_reason(self, terms: dict[str, float]) -> str | None:
        """Why this step's update must not be applied, from its loss terms: ``nonfinite`` (a
        term is NaN/inf) or ``spike`` (the loss beyond ``train.spike_sigma`` standard deviations
        of the recent losses, once half the window is filled); None to apply it."""
        if not all(math.isfinite(v) for v in terms.values()):
            return "nonfinite"
        k, recent = self.cfg.train.spike_sigma, self.recent_losses
        if k > 0 and len(recent) >= max(2, (recent.maxlen or 2) // 2):
            mean = sum(recent) / len(recent)
            std = math.sqrt(sum((x - mean) ** 2 for x in recent) / len(recent))
            if terms["ce_loss"] > mean + k * std:
                return "spike"
        return None

    def _check_divergence(self, step: int, loss: float) -> None:
        """Count a non-finite step (its update was skipped on every rank); past
        ``train.nonfinite_patience`` in a row, stop with one line."""
        if self.last_skip == "spike":
            self.logger.info(f"step {step}: loss {loss:.4g} is a spike, update skipped")
        if self.last_skip != "nonfinite":
            self.nonfinite_streak = 0
            return
        self.nonfinite_streak += 1
        patience = self.cfg.train.nonfinite_patience
        self.logger.info(
            f"step {step}: loss {loss:.4g} or gradients not finite, update skipped on every rank "
            f"({self.nonfinite_streak} in a row; the run stops after {patience + 1})"
        )
        if self.nonfinite_streak > patience:
            self.step = step
            self._write_status("diverged")
            newest = list_checkpoints(self.ckpt_root)
            kept = f"the newest checkpoint is {newest[-1]}" if newest else "there is no checkpoint"
            raise TrainingDiverged(
                f"training diverged: step {step} is the {self.nonfinite_streak}th in a row with a "
                f"non-finite loss or gradients (train.nonfinite_patience={patience}); nothing was "
                f"saved since and {kept} (resume from it with a lower optim.lr or more clipping)"
            )

    @torch.no_grad()
    def evaluate(self, dataset: WindowDataset | None = None) -> float:
        """Mean loss over the fixed validation batches of ``dataset`` (default: the validation
        split; a blend source's own held-out windows for its ``val_loss/<name>``), split across
        dp ranks."""
        dataset = dataset if dataset is not None else self.data.val
        if dataset is None:
            return float("nan")
        self.model.eval()
        batches = list(
            EvalBatches(dataset, self.cfg.train.micro_batch_size, self.cfg.train.eval_batches)
        )
        acc = torch.zeros(2, dtype=torch.float64, device=self.device)
        mine = batches[self.dims.dp_rank :: self.dims.dp]
        if self.dims.ep > 1 and batches:
            # Expert parallelism all-to-alls in every MoE forward: every rank runs as many
            # forwards as the busiest one (the extra ones repeat a batch and are not counted).
            mine += [None] * (-(-len(batches) // self.dims.dp) - len(mine))
        for batch in mine:
            if batch is None:  # a forward for the collectives only
                self.runner.evaluate_loss(batches[0].to(self.device))
                continue
            batch = batch.to(self.device)
            loss = self.runner.evaluate_loss(batch).item()
            n = batch[:, 1:].numel()
            acc += torch.tensor([loss * n, n], dtype=torch.float64, device=self.device)
        if self.dims.replicas > 1:  # dp x cp: the cp ranks count the same batches alike
            dist.all_reduce(acc, group=self.groups.dp_group)
        self.model.train()
        return (acc[0] / acc[1]).item() if acc[1] > 0 else float("nan")

    # -- checkpoints and stopping ------------------------------------------------------------

    def save(self) -> Path:
        """Save a checkpoint of the current step: complete on return in the foreground; with
        ``checkpoint.async_save`` written in the background and committed at a later step
        boundary (``engine.checkpointing``)."""
        tok = self.data.tokenizer
        return self.checkpointer.save(
            self.step,
            trainer_state={
                "sampler": self.sampler.state_dict(),
                # the loss-spike window and skip counts continue exactly on resume
                "guard": {"recent_losses": list(self.recent_losses), "skips": self.skips},
            },
            config_yaml=to_yaml(self.cfg),
            extra_files={n: self.out_dir / n for n in tok.files} if tok is not None else {},
        )

    def _saved_at(self, step: int) -> bool:
        return self.checkpointer.last_step == step

    def _should_stop(self) -> bool:
        """Whether a signal asked any rank to stop; in the same all-reduce, whether every rank's
        background checkpoint write has completed (then it is committed here) or one failed
        (then every rank ends with its line)."""
        flags = [1.0 if self.stop.signal is not None else 0.0, *self.checkpointer.flags()]
        flag = torch.tensor(flags, device=self.device)
        if self.dims.distributed:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # all ranks decide the same
        stop, busy_anywhere, failed_anywhere = (bool(v) for v in flag.tolist())
        self.checkpointer.settle(busy_anywhere, failed_anywhere)  # raises on every rank if failed
        return stop

    def _global_params(self) -> int:
        """Parameters of the whole model (a rank holds only its shards and stages)."""
        return self.runner.num_params()

    def _banner(self) -> str:
        t, d = self.cfg.train, self.dims
        layout = describe_layout(d, self.cfg.parallel, self.strategy.describe())
        return (
            f"evoformer | {self._global_params():,} parameters | device {self.device} | "
            f"world {d.world_size} ({layout}) | {t.global_batch_size}x{t.seq_len} tokens/step, "
            f"grad accum {self.grad_accum} | {len(self.data.train):,} train windows | "
            f"{t.max_steps} steps | precision {self.cfg.precision} | out {self.out_dir}"
        )


def describe_layout(dims: ParallelDims, parallel: ParallelConfig, strategy: str) -> str:
    """The banner's layout words: model-parallel dimensions, then the data-parallel strategy
    (``strategy``: its own few words, e.g. "fsdp2 stage 3"), whatever the model layout."""
    layout = f"dp {dims.dp}"
    if dims.tp > 1:
        sp = ", sequence parallel" if parallel.sequence_parallel else ""
        layout = f"tp {dims.tp} x dp {dims.dp}{sp}"
    if dims.cp > 1:  # [pp, dp, cp, tp]
        layout = layout.replace(f"dp {dims.dp}", f"dp {dims.dp} x cp {dims.cp} ({dims.cp_kind})")
    if strategy:
        layout += f", {strategy}"
    if dims.pp > 1:
        layout = f"pp {dims.pp} ({parallel.pp_schedule}) x {layout}"
    if dims.ep > 1:
        layout += f", ep {dims.ep} (experts over ep, replicated over edp {dims.edp})"
    return layout

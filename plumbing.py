"""What every training run needs and no paper describes: options as a dataclass turned into
flags, the Run (device, torchrun, run folder, progress lines, metrics.jsonl, evaluation schedule,
atomic checkpoints, --resume, Ctrl-C and --stop-epoch) and the few collective operations the
methods use under torchrun. A method file reads it only through the names it imports.

Sections: run plumbing | distributed.
"""
import argparse
import dataclasses
import inspect
import json
import math
import os
import re
import signal
import sys
import threading
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn

from common import ARCHS, DATASETS, fail


# ============================================================== run plumbing

@dataclasses.dataclass
class RunArgs:
    """Plumbing options shared by every method (the method's Args adds the paper's)."""
    data_dir: str = "data"  # where datasets live (torchvision download target, or the ImageFolder root)
    out_dir: str = "runs"  # each run writes to <out_dir>/<method>-<date>-<time>/
    resume: str = ""  # checkpoint.pt (or its run folder) to continue from
    stop_epoch: int = 0  # stop after this epoch with a checkpoint (0: at --epochs); the schedule still spans --epochs
    seed: int = 0
    eval_every: int = 10  # kNN + collapse diagnostics every N epochs (and before the first)
    log_every: int = 50  # progress line every N steps
    steps_per_epoch: int = 0  # 0: one full pass over the data; N: shorter epochs of N steps
    probe_epochs: int = 100  # linear probe on frozen features at the end (0: skip)
    knn_k: int = 200  # kNN protocol of InstDisc / MoCo CIFAR
    knn_t: float = 0.1
    smoke: bool = False  # tiny run on 16-px synthetic data with the small backbone, same code path
    compile: bool = False  # torch.compile the networks (off: not yet measured to pay; benchmarks/throughput.py)


SMOKE = dict(dataset="synthetic", arch="small", image_size=16, epochs=2, batch_size=64, eval_every=2,
             steps_per_epoch=8, probe_epochs=5, log_every=4)


def _field_help(cls):
    """The trailing `# comment` of each dataclass field, used as its --help text."""
    helps = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            for line in inspect.getsource(klass).splitlines():
                m = re.match(r"\s+(\w+):.*?#\s*(.*)$", line)
                if m:
                    helps[m.group(1)] = m.group(2)
    return helps


def parse_args(Args, argv=None):
    """Args dataclass -> command line: every field is a --flag with its default."""
    doc = (sys.modules[Args.__module__].__doc__ or "").strip().split("\n\n")[0]
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    helps = _field_help(Args)
    for f in dataclasses.fields(Args):
        flag, default, h = "--" + f.name.replace("_", "-"), f.default, helps.get(f.name, " ")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=h)
        elif isinstance(default, tuple):
            parser.add_argument(flag, type=type(default[0]), nargs=len(default), default=default, help=h)
        else:
            parser.add_argument(flag, type=f.type, default=default, help=h)
    ns = vars(parser.parse_args(argv))
    if ns["smoke"]:  # smoke settings replace the defaults; flags given explicitly still win
        parser.set_defaults(**{k: v for k, v in SMOKE.items() if k in ns})
        ns = vars(parser.parse_args(argv))
    return Args(**{k: tuple(v) if isinstance(v, list) else v for k, v in ns.items()})


class Run:
    """One training run: device, processes, run folder, logging and checkpoints. A method file
    uses it in this order:

        run = Run(args, "simsiam")                   # device, torchrun, seed, run folder
        steps = run.steps_per_epoch(len(data.ssl_x))
        start = run.start(encoder, report, f=f, ...) # --resume: load all of f, ...; else log epoch 0
        f = run.distribute(f)                        # CUDA: channels_last; torchrun: DDP (+ SyncBN); --compile
        for epoch in range(start, args.epochs):
            for step, idx in run.batches(epoch): ...; run.step(loss, len(idx))
            run.end_epoch(epoch)                     # log, evaluate when due, checkpoint
        return run.finish(probe)
    """

    def __init__(self, args, method):
        self.args, self.method = args, method
        if args.resume:  # the run folder to continue, and the options it was started with
            path = args.resume if args.resume.endswith(".pt") else os.path.join(args.resume, "checkpoint.pt")
            if not os.path.isfile(path):
                fail(f"--resume {args.resume}: no checkpoint there; pass a checkpoint.pt or its run folder")
            self.out = os.path.dirname(os.path.abspath(path))
            adopt_saved_args(args, method, os.path.join(self.out, "args.json"))
        check_args(args)
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.is_main = self.rank == 0
        if torch.cuda.is_available():
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        else:
            self.device = torch.device("cpu")
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        if args.batch_size % self.world_size:
            fail(f"--batch-size {args.batch_size} (the global batch) is not divisible by the "
                 f"{self.world_size} processes; pick a multiple of {self.world_size}")
        self.batch_size = args.batch_size // self.world_size  # this rank's share of each batch
        torch.manual_seed(args.seed)  # the same on every rank: identical initial weights
        if not args.resume:
            out = base = os.path.join(args.out_dir, f"{method}-{time.strftime('%Y%m%d-%H%M%S')}")
            for n in range(1, 1000):  # two runs started in the same second
                if not os.path.exists(out):
                    break
                out = f"{base}-{n}"
            self.out = broadcast(out)  # rank 0's name for all
        self.checkpoint_path = os.path.join(self.out, "checkpoint.pt")
        if self.is_main:
            os.makedirs(self.out, exist_ok=True)
            with open(os.path.join(self.out, "args.json"), "w") as fh:
                json.dump({"method": method, **dataclasses.asdict(args)}, fh, indent=1)
        self.metrics, self.resume_at = {}, (0, 0)
        self._loss_sum, self._steps, self._images, self._t0 = None, 0, 0, 0.0
        self._stop_requested = False
        if self.world_size == 1 and threading.current_thread() is threading.main_thread():
            self._old_handlers = {s: signal.signal(s, self._request_stop) for s in (signal.SIGINT, signal.SIGTERM)}

    def steps_per_epoch(self, n):
        """Full global batches in one pass over n images, or --steps-per-epoch if fewer."""
        if self.args.batch_size > n:
            fail(f"--batch-size {self.args.batch_size} is larger than the dataset ({n} images); lower it")
        full = n // self.args.batch_size
        self.n, self.steps = n, min(full, self.args.steps_per_epoch) if self.args.steps_per_epoch > 0 else full
        return self.steps

    def start(self, encoder, report, **state):
        """`state`: everything that decides the rest of the run (networks, optimizer, queue...);
        it goes into every checkpoint. With --resume it is loaded from one, and the run goes on
        from the epoch and step saved there. A fresh run first logs report() (kNN and collapse
        diagnostics) of the network at initialization, as epoch 0. Returns the first epoch."""
        self.encoder, self.report, self.state = encoder, report, state
        if not self.args.resume:
            torch.manual_seed(self.args.seed + self.rank)  # each rank draws its own augmentations
            if self.args.eval_every > 0:
                self.metrics.update(self.log({"epoch": 0, **self._evaluate()}))
            return 0
        ckpt = torch.load(self.checkpoint_path, map_location=self.device, weights_only=False)
        if ckpt.get("method") != self.method:
            fail(f"--resume {self.args.resume} is a {ckpt.get('method')} run, not {self.method}; "
                 f"resume it with {ckpt.get('method')}.py")
        try:
            for name, obj in state.items():
                obj.load_state_dict(ckpt[name])
        except (RuntimeError, KeyError, ValueError) as e:
            first = str(e).strip().splitlines()[0]
            fail(f"--resume {self.args.resume}: the checkpoint does not fit this model ({first}); "
                 f"pass the same model options as the run it came from (see its args.json)")
        set_rng_state(ckpt["rng"][self.rank % len(ckpt["rng"])])
        self.metrics, self.resume_at = ckpt["metrics"], (ckpt["epoch"], ckpt["step"])
        self.print(f"resumed {self.checkpoint_path} at epoch {ckpt['epoch'] + 1} step {ckpt['step'] + 1}")
        return ckpt["epoch"]

    def distribute(self, module):
        """Under torchrun: batch norm over the global batch (SyncBatchNorm; CUDA only, gloo has
        none) and gradients averaged over ranks (DistributedDataParallel; modules without
        trainable parameters, e.g. BYOL's target, are left out). On CUDA the weights are stored
        channels_last (augmentation.augment makes the images so too), the layout fast convolutions want;
        with --compile the module is torch.compile'd. None of this changes the algorithm."""
        if self.device.type == "cuda":
            module = module.to(memory_format=torch.channels_last)
        if self.world_size > 1:
            if self.device.type == "cuda":
                module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
            if any(p.requires_grad for p in module.parameters()):
                from torch.nn.parallel import DistributedDataParallel
                ids = [self.device] if self.device.type == "cuda" else None
                module = DistributedDataParallel(module, device_ids=ids)
        return torch.compile(module) if self.args.compile else module

    def batches(self, epoch):
        """This rank's index batches of one epoch: a permutation drawn from (seed, epoch), the same
        on every rank, cut into global batches of which each rank takes its own slice. After a
        stop request (Ctrl-C) it saves a checkpoint at the current step and exits."""
        g = torch.Generator().manual_seed(self.args.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.n, generator=g).to(self.device)
        first = self.resume_at[1] if epoch == self.resume_at[0] else 0
        self._t0, self._epoch = time.time(), epoch
        for step in range(first, self.steps):
            self._step = step
            begin = step * self.args.batch_size + self.rank * self.batch_size
            yield step, perm[begin:begin + self.batch_size]
            if self._stop_requested:
                self.save(epoch, step + 1)
                self.print(f"stopped at epoch {epoch + 1} step {step + 1}; checkpoint saved, go on with "
                           f"--resume {self.out}")
                raise SystemExit(130)

    def step(self, loss, images):
        """Add up the loss on the device (no host sync); every --log-every steps print a progress
        line (loss, source images per second, ETA) and stop if the loss is not finite."""
        loss = loss.detach().float()
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        self._steps, self._images = self._steps + 1, self._images + images * self.world_size
        if (self._step + 1) % self.args.log_every == 0:
            value, secs = loss.item(), time.time() - self._t0
            self._check_finite(value)
            left = (self.args.epochs - self._epoch) * self.steps - self._step - 1
            self.print(f"epoch {self._epoch + 1} step {self._step + 1}/{self.steps}  loss {value:.4f}  "
                       f"{self._images / secs:.0f} img/s  ETA {_hms(secs / self._steps * left)}")

    def end_epoch(self, epoch, **extra):
        """Log the epoch (mean loss over ranks, images/s, `extra`), evaluate when due, checkpoint."""
        loss = all_reduce(self._loss_sum / max(self._steps, 1)).item() / self.world_size if self._steps else None
        secs = time.time() - self._t0
        self._check_finite(loss if loss is not None else 0.0)
        record = {"epoch": epoch + 1, "loss": loss, "img_per_s": self._images / secs, "epoch_s": secs, **extra}
        self._loss_sum, self._steps, self._images = None, 0, 0
        last = epoch + 1 == self.args.epochs or epoch + 1 == self.args.stop_epoch
        if self.args.eval_every > 0 and ((epoch + 1) % self.args.eval_every == 0 or last):
            record.update(self._evaluate())
        self.metrics.update(self.log(record))
        self.save(epoch + 1, 0)
        if epoch + 1 == self.args.stop_epoch and not epoch + 1 == self.args.epochs:
            self.print(f"stopped after epoch {epoch + 1} (--stop-epoch); go on with --resume {self.out}")
            self._restore_signals()
            raise SystemExit(0)

    def finish(self, probe):
        """Linear probe (rank 0) unless --probe-epochs 0; log and return the final metrics."""
        if self.args.probe_epochs > 0:
            self.metrics["linear_top1"] = broadcast(probe() if self.is_main else None)
        self.log({"final": True, **self.metrics})
        if self.world_size > 1:
            self._check_replicas()
        self.print(f"run folder: {self.out}")
        self._restore_signals()
        return {**self.metrics, "run_dir": self.out}

    def save(self, epoch, step):
        """Atomic checkpoint of the state at (epoch, step) with every rank's RNG, and backbone.pt."""
        rng = [None] * self.world_size
        if self.world_size > 1:
            dist.all_gather_object(rng, rng_state())
        else:
            rng = [rng_state()]
        if self.is_main:
            state = {name: obj.state_dict() for name, obj in self.state.items()}
            save_atomic({"method": self.method, "args": dataclasses.asdict(self.args), "epoch": epoch,
                         "step": step, "rng": rng, "metrics": self.metrics, **state}, self.checkpoint_path)
            save_atomic(self.encoder.state_dict(), os.path.join(self.out, "backbone.pt"))

    def log(self, record):
        """One record: a line on the screen and a JSON line in metrics.jsonl (rank 0)."""
        if self.is_main:
            with open(os.path.join(self.out, "metrics.jsonl"), "a") as fh:
                fh.write(json.dumps(record) + "\n")
            print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in record.items() if not isinstance(v, list)), flush=True)
        return record

    def print(self, *a):
        if self.is_main:
            print(*a, flush=True)

    def autocast(self):
        """bf16 autocast on CUDA; nothing on CPU. Losses are computed in float32 outside it."""
        return torch.autocast("cuda", torch.bfloat16) if self.device.type == "cuda" else nullcontext()

    def _evaluate(self):
        return broadcast(self.report() if self.is_main else None)

    def _check_finite(self, loss):
        if not math.isfinite(loss):
            kept = f"the last good checkpoint is {self.checkpoint_path}" if os.path.exists(self.checkpoint_path) \
                else "no checkpoint was written"
            fail(f"the loss became {loss} in epoch {self._epoch + 1}; {kept}; lower the learning rate (--base-lr)")

    def _check_replicas(self):
        """Every rank must end with the same weights (DDP and identical EMA updates keep them so)."""
        params = torch.cat([p.detach().float().flatten() for obj in self.state.values()
                            if isinstance(obj, nn.Module) for p in obj.parameters()])
        ref = params.clone()
        dist.broadcast(ref, src=0)
        if all_reduce((params - ref).abs().max(), "max").item() > 0:
            fail("the ranks ended with different weights; please report this as a bug")
        self.print(f"parameters identical on all {self.world_size} ranks")

    def _restore_signals(self):
        for s, handler in getattr(self, "_old_handlers", {}).items():
            signal.signal(s, handler)

    def _request_stop(self, signum, frame):
        if self._stop_requested:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self._stop_requested = True
        print("\nstopping after this step with a checkpoint (press Ctrl-C again to quit without one)",
              file=sys.stderr, flush=True)


# may differ between a run and its --resume: they do not change what the run computes, except
# base_lr (to go on from the last good checkpoint with a lower rate after the loss diverged)
RESUME_MAY_CHANGE = ("resume", "out_dir", "data_dir", "stop_epoch", "eval_every", "log_every", "probe_epochs",
                     "knn_k", "knn_t", "smoke", "base_lr", "compile")


def adopt_saved_args(args, method, path):
    """--resume continues the run with the options it was started with: options left out take
    the run's values; one given with another value than the run's is an error."""
    if not os.path.isfile(path):
        fail(f"--resume: {path} is missing; resume from a run folder written by this code")
    with open(path) as fh:
        saved = json.load(fh)
    other = saved.pop("method", method)
    if other != method:
        fail(f"--resume {args.resume} is a {other} run, not {method}; resume it with {other}.py")
    defaults = type(args)()
    for name, old in saved.items():
        if name in RESUME_MAY_CHANGE or not hasattr(args, name):
            continue
        old, new = tuple(old) if isinstance(old, list) else old, getattr(args, name)
        if new != old:
            if new != getattr(defaults, name):
                fail(f"--resume: that run used --{name.replace('_', '-')} {old}, not {new}; leave the "
                     f"option out to continue it, or start a new run")
            setattr(args, name, old)


def check_args(args):
    """One clear line for settings that cannot work, before anything is loaded."""
    for name in ("epochs", "batch_size", "base_lr", "image_size"):
        if getattr(args, name, 1) <= 0:
            fail(f"--{name.replace('_', '-')} {getattr(args, name)}: must be positive")
    for name in ("eval_every", "steps_per_epoch", "probe_epochs", "stop_epoch"):
        if getattr(args, name) < 0:
            fail(f"--{name.replace('_', '-')} {getattr(args, name)}: must be 0 or more")
    if args.log_every <= 0:
        fail(f"--log-every {args.log_every}: must be positive")
    if args.dataset not in DATASETS:
        fail(f"unknown --dataset {args.dataset!r}; choose one of {', '.join(DATASETS)}")
    if args.arch not in ARCHS:
        fail(f"unknown --arch {args.arch!r}; choose one of {', '.join(ARCHS)}")


def _hms(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def save_atomic(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state():
    """The random number generators' states (this process: CPU and its current GPU)."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state):
    torch.set_rng_state(state["cpu"].cpu())
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


# =============================================================== distributed
# Identities in one process; under torchrun (RANK / WORLD_SIZE set) they talk to the other ranks.

def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def broadcast(obj):
    """Rank 0's Python object on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce(x, op="sum"):
    """Sum (or max) of a tensor over ranks, in place."""
    if world_size() > 1:
        dist.all_reduce(x, dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return x


class _GatherWithGrad(torch.autograd.Function):
    """Forward: the rows of every rank, concatenated in rank order. Backward: the gradient of the
    concatenation is summed over ranks (each rank's loss uses every rank's rows) and each rank
    keeps the rows of its own input."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = all_reduce(grad.contiguous().clone())
        n = len(grad) // dist.get_world_size()
        return grad[dist.get_rank() * n:(dist.get_rank() + 1) * n]


def gather_with_grad(x):
    """All ranks' rows of x (B x d each) as (world_size x B) x d, gradient flowing back to each
    rank's own rows: negatives from the whole global batch in contrastive losses."""
    return _GatherWithGrad.apply(x) if world_size() > 1 else x


def unwrap(module):
    """The module inside torch.compile's and DistributedDataParallel's wrappers (or the module itself)."""
    module = getattr(module, "_orig_mod", module)
    return getattr(module, "module", module)

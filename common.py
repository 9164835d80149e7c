"""What the five method files share and no paper describes: run helpers (flags, set-up, resume,
logging, checkpoints), torchrun collectives, LARS and the learning-rate schedule, data (in device
memory, or streamed from disk by DataLoader workers), the batched augmentation, backbone and
evaluation. Plain functions; the training loop itself is in
each method file. Neutral names here (backbone, mlp, features); each method file uses its own
paper's symbols.

Sections: run | distributed | optimization | data | augmentation | backbone | evaluation.
"""
import argparse
import copy
import dataclasses
import datetime
import inspect
import json
import math
import os
import re
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def fail(message):
    """Stop with one line on stderr and exit status 1 (no traceback)."""
    raise SystemExit(f"error: {message}")


# ======================================================================= run

@dataclasses.dataclass
class RunArgs:
    """Options shared by every method (the method's Args adds its paper's hyper-parameters)."""
    data_dir: str = "data"  # torchvision download target, or the ImageFolder root
    out_dir: str = "runs"  # each run writes to <out_dir>/<method>-<date>-<time>/
    resume: str = ""  # a run folder (its checkpoint.pt) or a checkpoint file to continue from
    stop_epoch: int = 0  # stop after this epoch (0: at --epochs); the schedule still spans --epochs
    seed: int = 0
    eval_every: int = 10  # kNN + collapse diagnostics every N epochs (and before the first)
    log_every: int = 50  # progress line every N steps
    steps_per_epoch: int = 0  # 0: one full pass over the data; N: shorter epochs of N steps
    probe_epochs: int = 100  # linear probe on frozen features at the end (0: skip)
    probe: str = "augmented"  # probe protocol: augmented (the papers': crop + flip) | cached (fast)
    knn_k: int = 200  # kNN protocol of InstDisc / MoCo CIFAR
    knn_t: float = 0.1
    smoke: bool = False  # tiny run on 16-px synthetic data with the small backbone, same code path
    compile: bool = False  # torch.compile the networks and the augmentation (README: speed)
    stream: bool = False  # --dataset folder: decode images in DataLoader workers, batch by batch
    workers: int = 8  # the streamed path's decoding processes per GPU (0: in the main process)
    skip_bad_images: bool = False  # streamed path: skip (and name) damaged images, do not stop
    recipe: str = ""  # "imagenet": the file's ImageNet recipe as the defaults (see --help)


PROBES = ("augmented", "cached")
SMOKE = dict(dataset="synthetic", arch="small", image_size=16, epochs=2, batch_size=64,
             eval_every=2, steps_per_epoch=8, probe_epochs=1, log_every=4)
# may be given another value on --resume: they do not change the algorithm (compile: which
# random numbers the augmentation draws), except base_lr (to go on from the last good
# checkpoint with a lower rate after the loss diverged)
RESUME_MAY_CHANGE = ("data_dir", "eval_every", "log_every", "probe_epochs", "probe", "knn_k",
                     "knn_t", "smoke", "base_lr", "compile", "workers", "skip_bad_images")
RESUME_NEW = ("resume", "out_dir", "stop_epoch")  # always this invocation's


def parse_args(Args, argv=None, recipes=None):
    """Args dataclass -> command line: every field is a --flag with its default; the trailing
    `# comment` of each field is its help text. recipes: {"imagenet": {field: value}}, the
    defaults that --recipe imagenet puts in place of the CIFAR ones (flags given still win)."""
    module = sys.modules[Args.__module__]
    recipes = recipes or {}
    file = os.path.basename(module.__file__)
    def flag(k, v):
        k = k.replace("_", "-")
        if isinstance(v, bool):
            return f"--{k}" if v else f"--no-{k}"
        return f"--{k} {' '.join(map(str, v)) if isinstance(v, tuple) else v}"
    epilog = "".join(f"--recipe {name} sets: " + " ".join(flag(k, v) for k, v in r.items())
                     + "\n\n" for name, r in recipes.items())
    if "imagenet" in recipes:
        epilog += (f"ImageNet on 8 GPUs:\n  torchrun --nproc_per_node=8 {file} --recipe imagenet "
                   f"--data-dir /data/imagenet\nOn several nodes (the same command on each):\n"
                   f"  torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d "
                   f"--rdzv-endpoint=HOST:29500 {file} --recipe imagenet --data-dir /data/imagenet")
    parser = argparse.ArgumentParser(description=(module.__doc__ or "").strip().split("\n\n")[0],
                                     epilog=epilog or None, formatter_class=_HelpFormatter)
    helps = {}
    for klass in reversed(Args.__mro__):
        if dataclasses.is_dataclass(klass):
            helps.update(re.findall(r"^\s+(\w+):.*?#\s*(.*)$", inspect.getsource(klass), re.M))
    for f in dataclasses.fields(Args):
        flag, default, h = "--" + f.name.replace("_", "-"), f.default, helps.get(f.name, " ")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=h)
        elif isinstance(default, tuple):
            parser.add_argument(flag, type=type(default[0]), nargs=len(default), default=default,
                                help=h)
        else:
            parser.add_argument(flag, type=f.type, default=default, help=h)
    ns = vars(parser.parse_args(argv))
    if ns["recipe"]:  # the recipe's values replace the defaults; flags given explicitly still win
        if ns["recipe"] not in recipes:
            fail(f"unknown --recipe {ns['recipe']!r}; choose one of "
                 f"{', '.join(recipes) or 'none (this file has no other recipe)'}")
        parser.set_defaults(**recipes[ns["recipe"]])
        ns = vars(parser.parse_args(argv))
    if ns["smoke"]:  # smoke settings replace the defaults; flags given explicitly still win
        parser.set_defaults(**{k: v for k, v in SMOKE.items() if k in ns})
        ns = vars(parser.parse_args(argv))
    return Args(**{k: tuple(v) if isinstance(v, list) else v for k, v in ns.items()})


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help, the epilog's lines as written."""


def method_name(args):
    """'simsiam' for simsiam.Args (also when simsiam.py runs as __main__)."""
    path = sys.modules[type(args).__module__].__file__
    return os.path.splitext(os.path.basename(path))[0]


def setup(args):
    """Everything before the networks: with --resume, read the checkpoint and continue with the
    options it was started with; check the options; pick the device (CUDA if present: TF32,
    cuDNN autotuning); join the torchrun processes; seed (the same on every rank, so that the
    networks start identical); the run folder and its args.json; Ctrl-C and SIGTERM end the
    run with one line that says how to resume. Returns (device, run folder, checkpoint or None)."""
    ckpt, out = None, None
    if args.resume:
        path = args.resume
        if os.path.isdir(path):
            path = os.path.join(path, "checkpoint.pt")
        if not os.path.isfile(path):
            fail(f"--resume {args.resume}: no checkpoint there; pass a checkpoint.pt or its run "
                 f"folder")
        ckpt, out = read_checkpoint(path, args), os.path.dirname(os.path.abspath(path))
    check_args(args)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    else:
        device = torch.device("cpu")
        torch.set_flush_denormal(True)  # zero-initialized residual branches: CPU denormals crawl
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        # the others wait while rank 0 evaluates: at ImageNet scale beyond the 10-minute default
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(hours=2))
    if args.batch_size % world_size():
        fail(f"--batch-size {args.batch_size} (the global batch) does not split evenly over "
             f"{world_size()} processes; pick a multiple of {world_size()}")
    torch.manual_seed(args.seed)
    if out is None:
        method = method_name(args)
        out = base = os.path.join(args.out_dir, f"{method}-{time.strftime('%Y%m%d-%H%M%S')}")
        for n in range(1, 1000):  # two runs started in the same second get their own folders
            if not os.path.exists(out):
                break
            out = f"{base}-{n}"
        out = broadcast(out)  # rank 0's name for all
        if rank() == 0:
            os.makedirs(out)
            with open(os.path.join(out, "args.json"), "w") as fh:
                json.dump({"method": method, **dataclasses.asdict(args)}, fh, indent=1)
    if threading.current_thread() is threading.main_thread():
        def interrupted(signum, frame):
            if _writes["thread"] is not None:  # the checkpoint in flight lands first
                _writes["thread"].join()
            done = os.path.exists(os.path.join(out, "checkpoint.pt"))
            fail(f"interrupted ({signal.Signals(signum).name}); " + (
                f"go on from the last finished epoch with --resume {out}" if done else
                "no epoch had finished, so there is nothing to resume"))
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, interrupted)
    return device, out, ckpt


def check_args(args):
    """One clear line for settings that cannot work, before anything is loaded."""
    for name in ("epochs", "batch_size", "base_lr", "image_size", "log_every"):
        if getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} {getattr(args, name)}: must be positive")
    for name in ("eval_every", "steps_per_epoch", "probe_epochs", "stop_epoch"):
        if getattr(args, name) < 0:
            fail(f"--{name.replace('_', '-')} {getattr(args, name)}: must be 0 or more")
    if args.dataset not in DATASETS:
        fail(f"unknown --dataset {args.dataset!r}; choose one of {', '.join(DATASETS)}")
    if args.arch not in ARCHS:
        fail(f"unknown --arch {args.arch!r}; choose one of {', '.join(ARCHS)}")
    if args.probe not in PROBES:
        fail(f"unknown --probe {args.probe!r}; choose one of {', '.join(PROBES)}")


def read_checkpoint(path, args):
    """The checkpoint at path, checked; `args` takes the options the run was started with:
    options left out take the run's values, one given with another value is an error."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, empty, not a torch file, or not one of ours
        fail(f"--resume {path}: cannot read it as a checkpoint ({type(e).__name__}); it is damaged "
             f"or of another kind: resume from an intact checkpoint.pt, or start a new run")
    keys = {"method", "args", "epoch", "rng", "record"}
    if not isinstance(ckpt, dict) or not keys <= ckpt.keys() or not isinstance(ckpt["args"], dict):
        fail(f"--resume {path}: not a checkpoint written by these files; resume from the "
             f"checkpoint.pt of a run folder, or start a new run")
    method = method_name(args)
    if ckpt["method"] != method:
        fail(f"--resume {path} is a {ckpt['method']} run, not {method}; resume it with "
             f"{ckpt['method']}.py")
    defaults = type(args)()
    for name, old in ckpt["args"].items():
        if not hasattr(args, name):
            fail(f"--resume {path}: its option {name!r} is unknown to this {method}.py; resume "
                 f"it with the code that wrote it, or start a new run")
        new = getattr(args, name)
        old = tuple(old) if isinstance(old, list) else old
        if name in RESUME_NEW or new == old:
            continue
        if new != getattr(defaults, name) and name not in RESUME_MAY_CHANGE:
            fail(f"--resume: that run used --{name.replace('_', '-')} {old}, not {new}; leave "
                 f"the option out to continue it, or start a new run")
        if new == getattr(defaults, name):  # left out (or given as the default): the run's
            setattr(args, name, old)
    return ckpt


def resume(args, ckpt, state):
    """Load `state` (networks, optimizer, ...: everything that decides the rest of the run) and
    this rank's random state from the checkpoint. Returns (the epoch to go on from, the record
    of the last finished epoch); a new run: (0, {}), each rank seeded for its own augmentations."""
    if ckpt is None:
        torch.manual_seed(args.seed + rank())
        return 0, {}
    try:
        for name, obj in state.items():
            obj.load_state_dict(ckpt[name])
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        fail(f"--resume {args.resume}: the checkpoint does not fit this model ({first}); pass "
             f"the same model options as the run it came from (see its args.json)")
    rng = ckpt["rng"][rank() % len(ckpt["rng"])]
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    print_main(f"resumed {args.resume} after epoch {ckpt['epoch']}")
    return ckpt["epoch"], ckpt["record"]


def distribute(module, args):
    """Speed and scale around a network, never changing what it computes: on CUDA the weights
    are stored channels_last (Data.normalize() makes the images so too); under torchrun, BN over
    the global batch (SyncBatchNorm; CUDA only, gloo has none) and gradients averaged over ranks
    (DistributedDataParallel; a module with nothing to train, e.g. BYOL's target, is left out);
    --compile: torch.compile (the augmentation's: Recipe.compile)."""
    if next(module.parameters(), torch.empty(0)).is_cuda:
        module = module.to(memory_format=torch.channels_last)
        if world_size() > 1:
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if world_size() > 1 and any(p.requires_grad for p in module.parameters()):
        from torch.nn.parallel import DistributedDataParallel
        module = DistributedDataParallel(module)
    return torch.compile(module) if args.compile else module


def unwrap(module):
    """The module inside torch.compile's and DistributedDataParallel's wrappers."""
    module = getattr(module, "_orig_mod", module)
    return getattr(module, "module", module)


def autocast(device):
    """bf16 autocast on CUDA; nothing on CPU. Losses are computed in float32 outside it."""
    return torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else nullcontext()


def steps_per_epoch(args, n):
    """Full global batches in one pass over n images, or --steps-per-epoch if fewer."""
    if args.batch_size > n:
        fail(f"--batch-size {args.batch_size} is larger than the dataset ({n} images); lower it")
    full = n // args.batch_size
    return min(full, args.steps_per_epoch) if args.steps_per_epoch > 0 else full


def batches(args, epoch, data, recipes):
    """This rank's batches of one epoch, each as one random resized crop per recipe (the first
    op of each view; augment() does the rest), from memory or streamed (crops())."""
    seed = args.seed * 1_000_003 + epoch
    return crops(data, data.ssl_x, epoch_indices(args, seed, len(data.ssl_x)), recipes, seed)


def epoch_indices(args, seed, n):
    """This rank's image indices for each step of one epoch (steps x batch per rank): a
    permutation drawn from seed, the same on every rank, cut into global batches of
    --batch-size, of which each rank takes its own slice."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    perm = perm[:steps_per_epoch(args, n) * args.batch_size]
    return perm.view(-1, world_size(), args.batch_size // world_size())[:, rank()]


def log_step(out, args, epoch, step, steps, loss, t0):
    """Every --log-every steps a progress line: loss, images per second, time left. The only
    place in the step where the host waits for the device; a loss gone nan or inf stops here."""
    if (step + 1) % args.log_every == 0:
        value, secs = check_finite(loss.item(), out, epoch), time.time() - t0
        left = secs / (step + 1) * ((args.epochs - epoch) * steps - step - 1)
        print_main(f"epoch {epoch + 1} step {step + 1}/{steps}  loss {value:.4f}  "
                   f"{(step + 1) * args.batch_size / secs:.0f} img/s  ETA {hms(left)}")


def epoch_record(out, args, epoch, losses, t0):
    """The epoch in numbers: mean loss over its steps and all ranks, images per second (source
    images, all ranks), seconds, and the time left at this pace."""
    loss = all_reduce(torch.stack(losses).float().mean()).item() / world_size()
    secs = time.time() - t0
    return {"epoch": epoch + 1, "loss": check_finite(loss, out, epoch),
            "img_per_s": len(losses) * args.batch_size / secs, "epoch_s": secs,
            "eta": hms(secs * (args.epochs - epoch - 1))}


def check_finite(loss, out, epoch):
    if not math.isfinite(loss):
        path = os.path.join(out, "checkpoint.pt")
        if not os.path.exists(path):
            fail(f"the loss became {loss} in epoch {epoch + 1}, before any checkpoint; start "
                 f"again with a lower --base-lr")
        fail(f"the loss became {loss} in epoch {epoch + 1}; the last good checkpoint is {path}; "
             f"go on from it with a lower learning rate (--resume {out} --base-lr ...)")
    return loss


def due(args, epoch):
    """Evaluate after this epoch? Every --eval-every epochs, and after the last one."""
    last = epoch + 1 in (args.epochs, args.stop_epoch)
    return args.eval_every > 0 and ((epoch + 1) % args.eval_every == 0 or last)


def log(out, record):
    """A line on the screen and a JSON line in metrics.jsonl (rank 0). Returns the record."""
    if rank() == 0:
        with open(os.path.join(out, "metrics.jsonl"), "a") as fh:
            fh.write(json.dumps(record) + "\n")
        print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in record.items() if not isinstance(v, list)), flush=True)
    return record


def print_main(*a):
    if rank() == 0:
        print(*a, flush=True)


def hms(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def save_checkpoint(out, args, epoch, state, record):
    """After `epoch` epochs: every network, the optimizer and the rest of `state`, every rank's
    random state and the epoch's record, copied to host memory, then written atomically by a
    background thread while training goes on (a kill never leaves half a file). Under torchrun
    the ranks' networks must still be identical (a check, or a bug report)."""
    rng = {"cpu": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    rngs = [rng]
    if world_size() > 1:
        rngs = [None] * world_size()
        dist.all_gather_object(rngs, rng)
        params = [p.detach().double().sum() for m in state.values() if isinstance(m, nn.Module)
                  for p in m.parameters()]
        total = torch.stack(params).sum().view(1) if params else torch.zeros(1)
        low, high = all_reduce(total.clone(), "min"), all_reduce(total.clone(), "max")
        if (low != high).any():
            fail("the processes' networks differ after an epoch; please report this as a bug")
    states = {name: obj.state_dict() for name, obj in state.items()}  # every rank: may gather
    if rank() == 0:
        obj = _host_copy({"method": method_name(args), "args": dataclasses.asdict(args),
                          "epoch": epoch, "rng": rngs, "record": record, **states})
        wait_for_writes()
        _writes["thread"] = threading.Thread(target=_write, args=(obj, out))
        _writes["thread"].start()


_writes = {"thread": None, "error": None}  # the checkpoint being written in the background


def _host_copy(obj):
    """A copy in host memory that training cannot change: tensors to the CPU, containers rebuilt."""
    if torch.is_tensor(obj):
        return obj.detach().cpu() if obj.is_cuda else obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _host_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_host_copy(v) for v in obj)
    return copy.deepcopy(obj)


def _write(obj, out):
    try:
        save_atomic(obj, os.path.join(out, "checkpoint.pt"))
    except Exception as e:  # reported by the main thread at its next wait
        _writes["error"] = f"{type(e).__name__}: {e}"


def wait_for_writes():
    """Until the checkpoint in flight is on disk; one line if it could not be written."""
    if _writes["thread"] is not None:
        _writes["thread"].join()
        _writes["thread"] = None
    if _writes["error"]:
        error, _writes["error"] = _writes["error"], None
        fail(f"could not write the checkpoint ({error}); free disk space or choose --out-dir, "
             f"then --resume from the last checkpoint.pt")


def save_atomic(obj, path):
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def finish(out, args, record, encoder):
    """The end of a run, or its stop at --stop-epoch: backbone.pt (loads into torchvision's
    ResNet, see backbone()), the last record marked final in metrics.jsonl, and where to look.
    Returns the record with the run folder."""
    wait_for_writes()
    if rank() == 0:
        save_atomic(encoder.state_dict(), os.path.join(out, "backbone.pt"))
    log(out, {"final": True, **record})
    if record.get("epoch", 0) < args.epochs:
        print_main(f"stopped after epoch {record.get('epoch', 0)}; go on with --resume {out}")
    print_main(f"run folder: {out}")
    return {**record, "run_dir": out}


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
    """Sum (or min, max) of a tensor over ranks, in place."""
    if world_size() > 1:
        dist.all_reduce(x, {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN,
                            "max": dist.ReduceOp.MAX}[op])
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


# ============================================================== optimization

def cosine_lr(step, total_steps, base_lr, warmup_steps=0, final_lr=0.0):
    """Linear warm-up to base_lr, then cosine decay to final_lr (SGDR without restarts)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return final_lr + (base_lr - final_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017, as SimCLR / BYOL
    use it). For each parameter tensor w with gradient g:
        g <- g + wd * w
        trust = eta * ||w|| / ||g||  (1 where either norm is 0)
        clip=True (LARC, as the CIFAR-10 recipes of BYOL and SwAV use it with eta 0.02):
            trust <- min(trust / lr, 1): the step is min(lr, eta * ||w|| / ||g||) * g, never
            larger than plain SGD's
        v <- momentum * v + trust * g
        w <- w - lr * v
    Groups with lars=False (biases and BN parameters, see exclude_bias_and_norm): plain SGD with
    momentum, no weight decay, no trust ratio. v is the state "momentum" of each parameter,
    created at its first step."""

    def __init__(self, params, lr, weight_decay=0.0, momentum=0.9, eta=0.001, clip=False):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      eta=eta, clip=clip, lars=True))

    @torch.no_grad()
    def step(self):
        # The rule above for all tensors of a group at once, in a number of operations that does
        # not grow with the number of tensors (torch._foreach_* ops are fused kernels on CUDA;
        # _scale) and without waiting for the device. tests/test_lars.py checks it per tensor.
        for group in self.param_groups:
            w = [p for p in group["params"] if p.grad is not None]
            if not w:
                continue
            g = [p.grad for p in w]
            if group["lars"]:
                g = torch._foreach_add(g, w, alpha=group["weight_decay"])
                w_norm = torch.stack(torch._foreach_norm(w))
                g_norm = torch.stack(torch._foreach_norm(g))
                trust = torch.where((w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm,
                                    1.0)
                if group["clip"] and group["lr"] > 0:
                    trust = (trust / group["lr"]).clamp(max=1.0)
                g = self._scale(g, trust)
            for p in w:
                if "momentum" not in self.state[p]:
                    self.state[p]["momentum"] = torch.zeros_like(p)
            v = [self.state[p]["momentum"] for p in w]
            torch._foreach_mul_(v, group["momentum"])
            torch._foreach_add_(v, g)
            torch._foreach_add_(w, v, alpha=-group["lr"])

    def _scale(self, g, trust):
        """[g[i] * trust[i]] in one multiplication: the memory of the g[i], concatenated, times
        trust repeated over each tensor's elements; returned as views with the layouts of g. The
        g[i] are new tensors (outputs of _foreach_add), hence dense: the memory of each holds
        exactly its elements, whatever its strides (e.g. channels_last)."""
        segments = self.__dict__.setdefault("_segments", {})  # not in the state: a cache
        key = (trust.device, tuple(x.numel() for x in g))
        if key not in segments:  # once: the sizes as a device tensor, and the offsets
            sizes = list(key[1])
            segments[key] = (torch.tensor(sizes, device=trust.device),
                             [sum(sizes[:i]) for i in range(len(sizes))])
        sizes, offsets = segments[key]
        flat = torch.cat([x.as_strided((x.numel(),), (1,), x.storage_offset()) for x in g])
        flat *= trust.repeat_interleave(sizes, output_size=len(flat))  # no host sync
        return [flat.as_strided(x.size(), x.stride(), o) for x, o in zip(g, offsets)]


def exclude_bias_and_norm(*modules):
    """Parameter groups for LARS: weights adapted and decayed; biases and BN (1-d) ones not."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim > 1]},
            {"params": [p for p in params if p.ndim <= 1], "lars": False, "weight_decay": 0.0}]


# ====================================================================== data

@dataclasses.dataclass
class Data:
    """The images (uint8 N x 3 x H x W on the device, or ImageFiles when streamed) and int64
    labels on the device."""
    ssl_x: "torch.Tensor | ImageFiles"  # what self-supervised training draws from
    train_x: "torch.Tensor | ImageFiles"  # labelled training set: kNN memory bank, probe
    train_y: torch.Tensor
    test_x: "torch.Tensor | ImageFiles"
    test_y: torch.Tensor
    num_classes: int

    def __post_init__(self):
        n = len(self.train_x)  # channel statistics of the training set (streamed: 2048 of them)
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:2048]
        x = (self.train_x.float() if torch.is_tensor(self.train_x) else
             torch.cat([c for c, in crops(self, self.train_x, idx.split(256), [None])]).float())
        x = x.div_(255)
        self.mean = x.mean(dim=(0, 2, 3)).view(1, 3, 1, 1).to(self.device)
        self.std = x.std(dim=(0, 2, 3)).clamp(min=1 / 255).view(1, 3, 1, 1).to(self.device)

    @property
    def device(self):
        return self.train_y.device

    @property
    def size(self):
        """Side of the images as evaluation sees them."""
        return self.train_x.size if isinstance(self.train_x, ImageFiles) else self.train_x.shape[-1]

    def normalize(self, x):
        """float images in [0, 1] -> per-channel standardized (statistics of the training set);
        on CUDA in channels_last, the layout of the networks there (distribute())."""
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x


@dataclasses.dataclass
class ImageFiles:
    """Images left on disk (the streamed path): DataLoader workers decode them when a batch needs
    them. Evaluation reads each as a size x size center square."""
    paths: list
    size: int
    workers: int = 0
    skip_bad: bool = False

    def __len__(self):
        return len(self.paths)


DATASETS = ("cifar10", "cifar100", "stl10", "folder", "synthetic")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff", ".gif")


def load_data(args, device):
    """Decode the dataset once into uint8 tensors on the device; an ImageFolder whose decoded
    images would not fit there (or with --stream) stays on disk as ImageFiles."""
    name, root, size, device = args.dataset, args.data_dir, args.image_size, torch.device(device)
    if name == "folder":
        (train, y_tr), (test, y_te) = folder_files(root)
        need = (len(train) + len(test)) * 3 * size * size
        stream = args.stream or need > 0.5 * free_memory(device)
        if stream:
            print_main(f"streaming {len(train)} + {len(test)} images from {root} with "
                       f"{args.workers} workers per process (decoded: {need / 2**30:.1f} GiB)")
            train, test = (ImageFiles(p, size, args.workers, args.skip_bad_images)
                           for p in (train, test))
            return Data(train, train, y_tr.to(device), test, y_te.to(device),
                        int(y_tr.max()) + 1)
        x_tr = _read_all(train, size)
        parts = x_tr, x_tr, y_tr, _read_all(test, size), y_te
    elif args.stream:
        fail(f"--stream reads image files: use it with --dataset folder (not {name!r})")
    elif name == "synthetic":
        parts = synthetic_dataset(size)
    elif name in ("cifar10", "cifar100", "stl10"):
        parts = _torchvision_dataset(name, root)
    else:
        fail(f"unknown --dataset {name!r}; choose one of {', '.join(DATASETS)}")
    ssl_x, train_x, train_y, test_x, test_y = parts
    ssl_x, train_x, test_x = (_resize(x, size) for x in (ssl_x, train_x, test_x))
    num_classes = int(train_y.max()) + 1
    return Data(ssl_x.to(device), train_x.to(device), train_y.to(device), test_x.to(device),
                test_y.to(device), num_classes)


def free_memory(device):
    """Bytes free on the device (CUDA) or in host memory (CPU)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _resize(x, size):
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    out = [F.interpolate(c.float(), size=(size, size), mode="bilinear", antialias=True)
           .round().clamp(0, 255) for c in x.split(1024)]
    return torch.cat(out).to(torch.uint8)


def _torchvision_dataset(name, root):
    import torchvision.datasets as tvd
    try:
        if name == "stl10":
            tr, te, un = (tvd.STL10(root, split=s, download=True)
                          for s in ("train", "test", "unlabeled"))
            x = {k: torch.from_numpy(d.data) for k, d in (("tr", tr), ("te", te), ("un", un))}
            return (torch.cat([x["tr"], x["un"]]), x["tr"], torch.from_numpy(tr.labels).long(),
                    x["te"], torch.from_numpy(te.labels).long())
        cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
        tr, te = cls(root, train=True, download=True), cls(root, train=False, download=True)
    except Exception as e:  # offline machines end here
        fail(f"could not download {name} to {root!r} ({type(e).__name__}); without network, "
             f"unpack an ImageFolder copy and use --dataset folder --data-dir <root with train/ "
             f"and test/>")
    x_tr = torch.from_numpy(tr.data).permute(0, 3, 1, 2).contiguous()
    x_te = torch.from_numpy(te.data).permute(0, 3, 1, 2).contiguous()
    return x_tr, x_tr, torch.tensor(tr.targets), x_te, torch.tensor(te.targets)


def folder_files(root):
    """ImageFolder layout: root/train/<class>/*.jpg and root/test/<class>/ (or val/). Returns
    (paths, labels) of train and of test."""
    layout = ("<root>/train/<class>/<image> and <root>/test/<class>/<image> (or val/ instead of "
              "test/)")
    if not os.path.isdir(root):
        fail(f"--data-dir {root!r} does not exist; expected {layout}")
    test_dir = next((os.path.join(root, d) for d in ("test", "val")
                     if os.path.isdir(os.path.join(root, d))), None)
    if not os.path.isdir(os.path.join(root, "train")) or test_dir is None:
        fail(f"--data-dir {root!r} is not in ImageFolder layout; expected {layout}")
    classes = sorted(d.name for d in os.scandir(os.path.join(root, "train")) if d.is_dir())
    if not classes:
        fail(f"{os.path.join(root, 'train')} has no class folders; expected {layout}")
    return _list_split(os.path.join(root, "train"), classes), _list_split(test_dir, classes)


def _list_split(split_dir, classes):
    files, labels = [], []
    for c, name in enumerate(classes):
        d = os.path.join(split_dir, name)
        if not os.path.isdir(d):
            fail(f"{split_dir} has no folder {name!r}; train/ and test/ must have the same class "
                 f"folders")
        found = sorted(e.path for e in os.scandir(d) if e.name.lower().endswith(IMAGE_EXTENSIONS))
        if not found:
            fail(f"{d} has no images ({', '.join(IMAGE_EXTENSIONS)}); add some, or remove that "
                 f"class folder from train/ and test/")
        files += found
        labels += [c] * len(found)
    return files, torch.tensor(labels)


def _read_all(paths, size):
    def read(path):
        try:
            return read_views(path, [None], size, None)[0]
        except Exception as e:
            fail(f"cannot read image {path}: {e}; remove or replace the file")
    with ThreadPoolExecutor(8) as pool:
        return torch.stack(list(pool.map(read, paths)))


def read_views(path, recipes, size, rng, draft=True):
    """Decode one file (RGB) into one uint8 3 x s x s view per recipe: recipe None is the image
    as evaluation sees it (the center square resized to size, bicubic); a Recipe is its random
    resized crop (box drawn by crop_box with rng on the full-resolution image, then resized to
    recipe.size, bilinear with antialias: torchvision's RandomResizedCrop). PIL decodes, torch
    resizes (faster than PIL's resize: benchmarks/loader.py). draft: a JPEG is decoded at 1/2,
    1/4 or 1/8 scale (DCT scaling) when every view still gets at least its output size in pixels;
    its boxes are then rounded to whole draft pixels."""
    from PIL import Image
    from torchvision.transforms.v2.functional import InterpolationMode, resized_crop
    with Image.open(path) as im:
        W, H = im.size
        boxes = []  # (top, left, height, width) on the full image, output side, resampling
        for r in recipes:
            if r is None:
                s = min(W, H)
                boxes.append(((H - s) // 2, (W - s) // 2, s, s, size, InterpolationMode.BICUBIC))
            else:
                boxes.append((*crop_box(H, W, r.scale, r.ratio, rng), r.size,
                              InterpolationMode.BILINEAR))
        k = min(min(h, w) / s for _, _, h, w, s, _ in boxes)
        sx = sy = 1.0
        if draft and im.format == "JPEG" and k >= 2:
            k = 8 if k >= 8 else 4 if k >= 4 else 2
            scaled = im.draft("RGB", (W // k, H // k))  # (mode, (0, 0, W / scale, H / scale))
            if scaled is not None:  # a draft pixel is scale x scale pixels of the full image
                sx, sy = scaled[1][2] / W, scaled[1][3] / H
        im = im.convert("RGB")
        x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        x = x.view(im.size[1], im.size[0], 3).permute(2, 0, 1)
    views = []
    for top, left, h, w, s, mode in boxes:  # the box in the decoded image's pixels
        y0, x0 = round(top * sy), round(left * sx)
        y1, x1 = max(y0 + 1, round((top + h) * sy)), max(x0 + 1, round((left + w) * sx))
        views.append(resized_crop(x, y0, x0, y1 - y0, x1 - x0, [s, s], mode, antialias=True)
                     .contiguous())
    return views


def crop_box(H, W, scale, ratio, rng):
    """torchvision's RandomResizedCrop.get_params for one image, drawn with rng (random.Random):
    10 tries of (area, log-ratio), the first that fits wins, else the central crop with the
    ratio clamped. Returns (top, left, height, width)."""
    area = H * W
    for _ in range(10):
        a = area * rng.uniform(*scale)
        r = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = int(round(math.sqrt(a * r))), int(round(math.sqrt(a / r)))
        if 0 < w <= W and 0 < h <= H:
            return rng.randint(0, H - h), rng.randint(0, W - w), h, w
    r = W / H
    if r < ratio[0]:
        w, h = W, int(round(W / ratio[0]))
    elif r > ratio[1]:
        h, w = H, int(round(H * ratio[1]))
    else:
        w, h = W, H
    return (H - h) // 2, (W - w) // 2, h, w


def crops(data, x, index_batches, recipes, seed=0):
    """For each batch of indices into x, one view per recipe of those images, on the data's
    device: a Recipe's random resized crop, float in [0, 1] (images in memory: cut on the device)
    or uint8 (ImageFiles: cut at full resolution by DataLoader workers, each image's box drawn
    from (seed, index)); None: the images as evaluation sees them, uint8."""
    if isinstance(x, ImageFiles):
        yield from _stream(data, x, index_batches, recipes, seed)
        return
    if torch.is_tensor(index_batches):
        index_batches = index_batches.to(x.device)  # once: no host-to-device copy per step
    for idx in index_batches:
        images = x[idx.to(x.device)]
        yield [images if r is None else crop(images, r) for r in recipes]


class _Decode(torch.utils.data.Dataset):
    """Dataset whose item is a whole batch: a list of indices -> (one uint8 tensor per recipe,
    the damaged files met as [(position, path, reason)])."""

    def __init__(self, files, recipes, seed):
        self.files, self.recipes, self.seed = files, recipes, seed

    def __getitem__(self, idx):
        import random
        out = [torch.zeros(len(idx), 3, *(2 * [r.size if r else self.files.size]),
                           dtype=torch.uint8) for r in self.recipes]
        bad = []
        for j, i in enumerate(idx):
            path = self.files.paths[i]
            try:
                views = read_views(path, self.recipes, self.files.size,
                                   random.Random(self.seed * 100_000_007 + i))
            except Exception as e:  # reported by the main process: no traceback from a worker
                bad.append((j, path, f"{type(e).__name__}: {e}"))
                continue
            for o, v in zip(out, views):
                o[j] = v
        return out, bad


_skipped = set()  # damaged files named once each (--skip-bad-images)


def _stream(data, files, index_batches, recipes, seed):
    loader = torch.utils.data.DataLoader(
        _Decode(files, recipes, seed), sampler=[idx.tolist() for idx in index_batches],
        batch_size=None, num_workers=files.workers, pin_memory=data.device.type == "cuda",
        prefetch_factor=4 if files.workers else None)
    for out, bad in loader:
        for j, path, reason in bad:
            if not files.skip_bad:
                fail(f"cannot read image {path} ({reason}); remove or replace the file, or pass "
                     f"--skip-bad-images")
            if path not in _skipped:
                _skipped.add(path)
                print(f"skipping damaged image {path} ({reason})", file=sys.stderr, flush=True)
        if bad:  # each damaged image's place in the batch goes to an intact image of the batch
            good = sorted(set(range(len(out[0]))) - {j for j, _, _ in bad})
            if not good:
                fail(f"every image of a batch is damaged (e.g. {bad[0][1]}); check --data-dir")
            fill = torch.tensor([good[j % len(good)] for j, _, _ in bad])
            for o in out:
                o[[j for j, _, _ in bad]] = o[fill]
        yield [o.to(data.device, non_blocking=True) for o in out]


def synthetic_dataset(size=32, n_train=2560, n_test=1000, seed=1234):
    """Gray gratings whose class is their orientation, 5 classes: 0, +-22.5, +-45, +-67.5 and 90
    degrees (a class holds theta and -theta, which a horizontal flip swaps). Each image has its own
    frequency (3-9 cycles across 32 px), phase, brightness, contrast and pixel noise. These
    nuisances dominate a random network's features: kNN 74-83% at 24 and 32 px, 83-86% at 16 px
    (BN statistics measured). The augmentations vary them between two views while the class
    survives: the crop changes frequency and phase, the colour jitter brightness and contrast, and
    the crop's aspect ratio (3/4 to 4/3) bends an orientation by at most about 8 degrees, less than
    half the 22.5 between classes. So learning invariance to the views raises kNN above the random
    network's."""
    g = torch.Generator().manual_seed(seed)
    classes = 5

    def draw(n):
        u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, 1, 1, generator=g)  # noqa: E731
        y = torch.arange(n) % classes
        sign = torch.where(torch.rand(n, 1, 1, generator=g) < 0.5, -1.0, 1.0)
        theta = sign * (y.float() * math.pi / 2 / (classes - 1)).view(n, 1, 1)
        coords = torch.linspace(0, 1, size)
        yy, xx = torch.meshgrid(coords, coords, indexing="ij")
        cycles = u(3, 9) * size / 32
        along = xx * torch.cos(theta) + yy * torch.sin(theta)  # distance along the grating's normal
        wave = torch.sin(2 * math.pi * cycles * along + u(0, 2 * math.pi))
        img = (u(0.35, 0.65) + u(0.1, 0.3) * wave).unsqueeze(1).expand(n, 3, size, size)
        img = img + 0.05 * torch.randn(n, 3, size, size, generator=g)
        return (img.clamp(0, 1) * 255).round().to(torch.uint8), y

    x_tr, y_tr = draw(n_train)
    x_te, y_te = draw(n_test)
    return x_tr, x_tr, y_tr, x_te, y_te


# ============================================================== augmentation
# Every image of a batch gets its own random parameters; each op equals the
# torchvision.transforms.v2.functional op applied image by image (tests/test_augment.py).

@dataclasses.dataclass
class Recipe:
    """One view's augmentation, in the order SimCLR / BYOL / SimSiam apply it."""
    size: int = 32  # output side
    scale: tuple = (0.2, 1.0)  # random resized crop: area fraction
    ratio: tuple = (3 / 4, 4 / 3)  # and aspect ratio
    flip_p: float = 0.5
    jitter: tuple = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue strengths
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple = (0.1, 2.0)
    solarize_p: float = 0.0
    compile: bool = False  # --compile: crop() and augment() run torch.compile'd (speed only)


_compiled = {}  # function -> its torch.compile'd form


def compiled(fn):
    """fn under torch.compile with static shapes: one graph per recipe and input shape, its
    hundreds of small operators fused into a few kernels. Made once per function."""
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=False)
    return _compiled[fn]


def crop(x, r):
    """uint8 batch -> each image's random resized crop (r.size square), float in [0, 1]."""
    if r.compile and not torch.compiler.is_compiling():
        return compiled(crop)(x, r)
    B, _, H, W = x.shape
    return resized_crop(x.float().div_(255), crop_params(B, H, W, r.scale, r.ratio, x.device),
                        r.size)


def augment(x, r):
    """Each image's random resized crop (crop() or a streamed crop: float in [0, 1] or uint8)
    -> its randomly augmented view, float, before normalization: the rest of recipe r."""
    if r.compile and not torch.compiler.is_compiling():
        return compiled(augment)(x, r)
    B, dev = len(x), x.device
    x = x.float().div_(255) if x.dtype == torch.uint8 else x
    x = hflip(x, torch.rand(B, device=dev) < r.flip_p)
    if r.jitter_p > 0:
        apply = torch.rand(B, device=dev) < r.jitter_p
        jittered = color_jitter(x, *jitter_params(B, r.jitter, dev))
        x = torch.where(apply.view(B, 1, 1, 1), jittered, x)
    if r.gray_p > 0:
        x = torch.where((torch.rand(B, device=dev) < r.gray_p).view(B, 1, 1, 1), grayscale(x), x)
    if r.blur_p > 0:
        sigma = torch.empty(B, device=dev).uniform_(*r.blur_sigma)
        blurred = gaussian_blur(x, sigma, blur_kernel_size(r.size))
        x = torch.where((torch.rand(B, device=dev) < r.blur_p).view(B, 1, 1, 1), blurred, x)
    if r.solarize_p > 0:
        x = torch.where((torch.rand(B, device=dev) < r.solarize_p).view(B, 1, 1, 1), solarize(x), x)
    return x


def crop_params(B, H, W, scale, ratio, device):
    """torchvision's RandomResizedCrop sampling, batched: 10 tries of (area, log-ratio), the first
    that fits wins, else the central crop. Returns B x 4 int (top, left, height, width)."""
    area = H * W * torch.empty(B, 10, device=device).uniform_(*scale)
    log_r = torch.empty(B, 10, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    w = torch.sqrt(area * torch.exp(log_r)).round()
    h = torch.sqrt(area / torch.exp(log_r)).round()
    ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = ok.float().argmax(dim=1, keepdim=True)
    w, h, found = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1), ok.any(dim=1)
    if W / H < ratio[0]:
        fw, fh = W, round(W / ratio[0])
    elif W / H > ratio[1]:
        fw, fh = round(H * ratio[1]), H
    else:
        fw, fh = W, H
    w, h = torch.where(found, w, float(fw)), torch.where(found, h, float(fh))
    top = torch.where(found, (torch.rand(B, device=device) * (H - h + 1)).floor(),
                      float((H - fh) // 2))
    left = torch.where(found, (torch.rand(B, device=device) * (W - w + 1)).floor(),
                       float((W - fw) // 2))
    return torch.stack([top, left, h, w], dim=1).long()


def _resize_matrix(start, length, in_size, out_size):
    """B x out_size x in_size weights of an antialiased bilinear resize of the window
    [start, start + length) -- the triangle filter of torch's interpolate(antialias=True)."""
    start, length = start.float().view(-1, 1, 1), length.float().view(-1, 1, 1)
    scale = length / out_size  # input pixels per output pixel
    support = scale.clamp(min=1.0)  # widen the filter when downscaling (antialias)
    center = scale * (torch.arange(out_size, device=start.device).view(1, -1, 1) + 0.5)
    j = torch.arange(in_size, device=start.device).view(1, 1, -1) - start  # position inside window
    w = (1 - ((j - center + 0.5) / support).abs()).clamp(min=0)
    w = w * ((j >= 0) & (j < length))
    return w / w.sum(dim=2, keepdim=True)


def resized_crop(x, boxes, size):
    """Crop each image to its box (top, left, height, width) and resize to size x size."""
    B, _, H, W = x.shape
    Ry = _resize_matrix(boxes[:, 0], boxes[:, 2], H, size)  # B x size x H
    Rx = _resize_matrix(boxes[:, 1], boxes[:, 3], W, size)  # B x size x W
    return Ry.unsqueeze(1) @ x @ Rx.transpose(1, 2).unsqueeze(1)


def hflip(x, mask):
    return torch.where(mask.view(-1, 1, 1, 1), x.flip(-1), x)


def jitter_params(B, strengths, device):
    """Factors as torchvision's ColorJitter draws them, and a random order of the 4 ops each."""
    b, c, s, h = strengths
    u = lambda lo, hi: torch.empty(B, device=device).uniform_(lo, hi)  # noqa: E731
    factors = (u(max(0, 1 - b), 1 + b), u(max(0, 1 - c), 1 + c), u(max(0, 1 - s), 1 + s), u(-h, h))
    order = torch.rand(B, 4, device=device).argsort(dim=1)
    return factors, order


def color_jitter(x, factors, order):
    """Brightness, contrast, saturation, hue, in each image's own random order."""
    ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
    for position in range(4):
        for k, op in enumerate(ops):
            chosen = (order[:, position] == k).view(-1, 1, 1, 1)  # no chosen.any(): a host sync
            x = torch.where(chosen, op(x, factors[k]), x)
    return x


def _gray(x):
    """ITU-R 601-2 luma, as torchvision: B x 1 x H x W."""
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _blend(x, other, f):
    f = f.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * other).clamp(0, 1)


def adjust_brightness(x, f):
    return _blend(x, torch.zeros_like(x), f)


def adjust_contrast(x, f):
    return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), f)


def adjust_saturation(x, f):
    return _blend(x, _gray(x), f)


def adjust_hue(x, f):
    """Rotate the hue: RGB -> HSV, h <- (h + f) mod 1, HSV -> RGB."""
    r, g, b = x.unbind(1)
    v, _ = x.max(dim=1)
    delta = v - x.min(dim=1).values
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    s = delta / torch.where(v > 0, v, torch.ones_like(v))
    h = torch.where(v == r, (g - b) / safe,
                    torch.where(v == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    h = torch.where(delta > 0, h / 6, torch.zeros_like(h))
    h = torch.remainder(h + f.view(-1, 1, 1), 1.0)
    i = torch.floor(h * 6)
    frac = h * 6 - i
    i = i.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * frac), v * (1 - s * (1 - frac))
    sector = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = torch.zeros_like(x)
    for k, rgb in enumerate(sector):
        out = torch.where((i == k).unsqueeze(1), torch.stack(rgb, dim=1), out)
    return out


def grayscale(x):
    return _gray(x).expand_as(x)


def blur_kernel_size(size):
    """About 10% of the image side, odd (SimCLR App. A: 23 px at 224)."""
    return max(3, int(0.1 * size) // 2 * 2 + 1)


def gaussian_blur(x, sigma, k):
    """Separable Gaussian blur, per-image sigma, reflect padding (torchvision's convention)."""
    B, C, H, W = x.shape
    t = torch.arange(k, device=x.device, dtype=x.dtype) - (k - 1) / 2
    kernel = torch.exp(-0.5 * (t.view(1, -1) / sigma.view(-1, 1)) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(C, dim=0)  # B*C x k
    y = F.pad(x.reshape(1, B * C, H, W), (k // 2,) * 4, mode="reflect")
    y = F.conv2d(y, kernel.view(B * C, 1, k, 1), groups=B * C)
    y = F.conv2d(y, kernel.view(B * C, 1, 1, k), groups=B * C)
    return y.view(B, C, H, W)


def solarize(x, threshold=0.5):
    return torch.where(x >= threshold, 1 - x, x)


# ================================================================== backbone

ARCHS = ("resnet18", "resnet50", "small")


def backbone(arch, image_size, zero_init_residual=False):
    """A torchvision ResNet without its classifier: images -> features (B x .dim).
    Images of 64 px or less get the CIFAR stem (3x3 conv, stride 1, no max-pool).
    'small' is for CPU runs and tests: one BasicBlock per stage (ResNet-10) and a 3x3 stride-2
    stem, about 8x cheaper than the CIFAR ResNet-18. zero_init_residual: the last BN of each
    residual block starts with weight 0, so that each block starts as relu(its shortcut)
    (torchvision's option; Goyal et al. 2017)."""
    from torchvision.models import resnet18, resnet50
    from torchvision.models.resnet import BasicBlock, ResNet
    if arch == "resnet18":
        net = resnet18(zero_init_residual=zero_init_residual)
    elif arch == "resnet50":
        net = resnet50(zero_init_residual=zero_init_residual)
    elif arch == "small":
        net = ResNet(BasicBlock, [1, 1, 1, 1], zero_init_residual=zero_init_residual)
    else:
        fail(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if arch == "small":
        net.conv1, net.maxpool = nn.Conv2d(3, 64, 3, 2, 1, bias=False), nn.Identity()
    elif image_size <= 64:
        net.conv1, net.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    net.dim = net.fc.in_features
    net.fc = nn.Identity()
    return net


# ================================================================ evaluation

@torch.no_grad()
def embed(net, x, data, batch_size=1024):
    """Features of uint8 images, network in eval mode (BN running statistics), float32."""
    was_training = net.training
    net.eval()
    chunks = crops(data, x, torch.arange(len(x)).split(batch_size), [None])
    out = torch.cat([net(data.normalize(c.float().div_(255))).float() for c, in chunks])
    net.train(was_training)
    return out


@torch.no_grad()
def knn_top1(train_f, train_y, test_f, test_y, num_classes, k=200, t=0.1, chunk=1024):
    """Weighted kNN (InstDisc): cosine similarity to the memory bank, the k nearest vote with
    weight exp(s / t). Returns top-1 accuracy in percent."""
    train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    k = min(k, len(train_f))
    correct = 0
    for f, y in zip(test_f.split(chunk), test_y.split(chunk)):
        sim, idx = (f @ train_f.T).topk(k, dim=1)
        votes = torch.zeros(len(f), num_classes, device=f.device)
        votes.scatter_add_(1, train_y[idx], (sim / t).exp())
        correct += (votes.argmax(dim=1) == y).sum().item()
    return 100.0 * correct / len(test_f)


def linear_probe(train_f, train_y, test_f, test_y, num_classes, epochs=100, batch_size=512, lr=0.1):
    """Linear classifier on frozen, standardized features (the fast variant: cached features,
    no augmentation), SGD momentum 0.9 with cosine decay. Returns test top-1 in percent."""
    if epochs <= 0:
        return float("nan")
    mean, std = train_f.mean(0), train_f.std(0) + 1e-6
    train_f, test_f = (train_f - mean) / std, (test_f - mean) / std
    clf = nn.Linear(train_f.shape[1], num_classes).to(train_f.device)
    opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9)
    steps = epochs * max(len(train_f) // batch_size, 1)
    g = torch.Generator(device=train_f.device).manual_seed(0)
    with torch.enable_grad():
        for s in range(steps):
            idx = torch.randint(len(train_f), (min(batch_size, len(train_f)),),
                                device=train_f.device, generator=g)
            for group in opt.param_groups:
                group["lr"] = cosine_lr(s, steps, lr)
            loss = F.cross_entropy(clf(train_f[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        return 100.0 * (clf(test_f).argmax(1) == test_y).sum().item() / len(test_f)


def output_std(z):
    """SimSiam Fig. 2: std over samples of each channel of l2-normalized z, averaged over
    channels. About 1/sqrt(d) when z spreads over the sphere, 0 when collapsed to a point."""
    return F.normalize(z.float(), dim=1).std(dim=0).mean().item()


def spectrum(z):
    """Eigenvalues, descending, of the covariance of the l2-normalized embeddings z (N x d), a
    float64 tensor of d. DirectCLR plots the covariance's singular values: it is symmetric
    positive semi-definite, so they are its eigenvalues (round-off negatives set to 0). All in
    float64, so the smallest ones are not lost (float64 matmuls never use TF32)."""
    z = F.normalize(z.double(), dim=1)
    z = z - z.mean(dim=0)
    cov = z.T @ z / len(z)
    return torch.linalg.eigvalsh(cov).flip(0).clamp(min=0)


def effective_rank(s):
    """Roy & Vetterli (2007): exp of the entropy of the normalized eigenvalues s (spectrum()),
    in float64; between 1 (all variance in one direction) and d (isotropic)."""
    s = s.double()
    if s.sum() < 1e-10:
        return 0.0  # no variance left above float32 round-off of the embeddings: collapse
    p = s / s.sum()
    p = p[p > 0]
    return math.exp(-(p * p.log()).sum().item())


def evaluate(net, data, args, heads=None):
    """kNN top-1 on backbone features, and collapse diagnostics of the backbone features and of
    each head (e.g. {"z": projector}) on the test set; computed on rank 0, returned on all. A
    network whose BN layers have never seen a batch (the network at initialization) is
    evaluated with statistics measured on training images: BN's initial ones (mean 0, variance
    1) would distort its features and make the random-network baseline look worse than it is."""
    return broadcast(_evaluate(net, data, args, heads or {}) if rank() == 0 else None)


def _evaluate(net, data, args, heads):
    if any(m.num_batches_tracked == 0 for m in _bn_layers(net)):
        net, heads = measure_bn_statistics(net, heads, data)
    train_f, test_f = embed(net, data.train_x, data), embed(net, data.test_x, data)
    metrics = {"knn_top1": knn_top1(train_f, data.train_y, test_f, data.test_y, data.num_classes,
                                    args.knn_k, args.knn_t)}
    outputs = {"r": test_f}
    with torch.no_grad():
        for name, head in heads.items():
            was_training = head.training
            outputs[name] = head.eval()(test_f).float()
            head.train(was_training)
    for name, z in outputs.items():
        s = spectrum(z)
        metrics[f"std_{name}"] = output_std(z)
        metrics[f"rank_{name}"] = effective_rank(s)
        # 8 significant digits: the small eigenvalues survive (the spectrum is plotted in log)
        metrics[f"spectrum_{name}"] = [float(f"{v:.8g}") for v in s.tolist()]
    return metrics


def _bn_layers(*modules):
    return [m for module in modules for m in module.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def measure_bn_statistics(net, heads, data, n=5120, batch_size=256):
    """Copies of net and heads whose BN running statistics are averages over n random training
    images (unaugmented), the heads fed with the network's output as in training."""
    net, heads = copy.deepcopy(net).train(), {k: copy.deepcopy(h).train() for k, h in heads.items()}
    for m in _bn_layers(net, *heads.values()):
        m.reset_running_stats()
        m.momentum = None  # a plain average over the batches below
    idx = torch.randperm(len(data.train_x), generator=torch.Generator().manual_seed(0))[:n]
    for x, in crops(data, data.train_x, idx.split(batch_size), [None]):
        r = net(data.normalize(x.float().div_(255)))
        for head in heads.values():
            head(r)
    return net, heads


def probe(net, data, args):
    """Linear-probe top-1 of net's frozen features and the protocol that gave it, args.probe:
    "augmented" (the papers', augmented_probe) or "cached" (the fast variant, linear_probe on
    features computed once); args.probe_epochs epochs (0: nan). Computed on rank 0, returned on
    all as {"linear_top1": ..., "linear_protocol": ...}."""
    protocol = getattr(args, "probe", "augmented")
    if protocol not in PROBES:
        fail(f"unknown --probe {protocol!r}; choose one of {', '.join(PROBES)}")
    if rank() != 0:
        return broadcast(None)
    if protocol == "augmented":
        top1 = augmented_probe(net, data, args.probe_epochs)
    else:
        train_f, test_f = embed(net, data.train_x, data), embed(net, data.test_x, data)
        top1 = linear_probe(train_f, data.train_y, test_f, data.test_y, data.num_classes,
                            args.probe_epochs)
    return broadcast({"linear_top1": top1, "linear_protocol": protocol})


def augmented_probe(net, data, epochs=100, batch_size=256, lr=30.0, seed=0):
    """The common CIFAR linear protocol (PAPERS.md, Evaluation protocols; lr 30 without weight
    decay comes from MoCo's linear classification, He et al. 2020): a linear classifier on the
    raw features of the frozen network (eval mode, no gradient), each training batch randomly
    crop-resized (area 0.08-1) and flipped; SGD momentum 0.9, lr * batch / 256 with cosine decay,
    no weight decay; tested on the unaugmented test images. Its own random stream (seed), the
    global one left as it was. Returns test top-1 in percent (nan for 0 epochs)."""
    if epochs <= 0:
        return float("nan")
    n, dev = len(data.train_x), data.device
    batch_size = min(batch_size, n)
    lr, steps = lr * batch_size / 256, n // batch_size
    recipe = Recipe(size=data.size, scale=(0.08, 1.0), jitter_p=0, gray_p=0)
    test_f = embed(net, data.test_x, data)
    was_training = net.training
    net.eval()
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), torch.enable_grad():
        torch.manual_seed(seed)
        clf = nn.Linear(test_f.shape[1], data.num_classes).to(dev)
        nn.init.normal_(clf.weight, std=0.01)
        nn.init.zeros_(clf.bias)
        opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9)
        for epoch in range(epochs):
            order = torch.randperm(n)[:steps * batch_size].view(steps, batch_size)
            views = crops(data, data.train_x, order, [recipe], seed * 1_000_003 + epoch)
            for i, (idx, (x,)) in enumerate(zip(order.to(dev), views)):
                with torch.no_grad():
                    f = net(data.normalize(augment(x, recipe))).float()
                for group in opt.param_groups:
                    group["lr"] = cosine_lr(epoch * steps + i, epochs * steps, lr)
                loss = F.cross_entropy(clf(f), data.train_y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    net.train(was_training)
    with torch.no_grad():
        return 100.0 * (clf(test_f).argmax(1) == data.test_y).sum().item() / len(test_f)

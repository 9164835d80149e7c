"""The one command a session runs on a rented GPU: every method at full size, throughput, a profile
of one SimSiam step, the streamed loader's figures and, with the time left, one accuracy run; all
of it as files in one folder.

On the device machine (one H200 / H100, the CIFAR-10 JPEG zip carried in the git-ignored .gpu/),
with the device tool's carry [".gpu"] and timeout_s 600:

    python3 benchmarks/gpu_check.py --data .gpu/cifar10-jpeg.zip --budget 540

Here, on a CPU, the same code end to end (synthetic data, small backbone, 16 px, batch 32, a few
steps; CUDA hidden; torch.compile with the aot_eager backend instead of inductor's C++ build):

    python3 benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check     # < 2 min on 2 cores

Flags after `--` go to part 4's train() (e.g. `-- --probe cached`); a second call can run part
4 alone (`--parts 4 --method byol`), its epoch time then measured first.

Parts, in the order they run (each checks the clock against --budget and is skipped, with the
reason in the report, when it would not fit; parts 1 and 2 come from the same runs):
  1. full size: each method's own train() (ResNet-18, batch 512, 32 px, its default recipe
     otherwise) for 2 epochs of --steps steps, eager, then (after part 3) with --compile: finite
     loss, peak GPU memory. A crash is recorded with its exception's last line; the rest goes on.
  2. throughput: images/s of the second of those epochs (the first is warm-up) and seconds per
     50k-image epoch; the conventional pipeline of benchmarks/throughput.py (torchvision
     per-image transforms in DataLoader workers, the same SimSiam model and step) as denominator.
  3. profile: torch.profiler over 2 SimSiam steps after 3 (CPU and CUDA activities): kernel time
     against the host's time to issue the step and its launch calls, kernel launches per step, the
     10 kernels with the most device time (CPU: operator calls and the 10 ops with most self time).
     Then the step's stages timed alone (the two views; the networks' forward and backward; the
     update), each eager, compiled as --compile does it, and with CUDA graphs (torch.compile
     mode reduce-overhead): which stage compiling speeds up, and by how much.
  5. loader (before 4): benchmarks/loader.py on this machine's CPUs and GPU (256 generated
     ImageNet-sized JPEGs): one worker's decode rate per path, decode_jpeg on the GPU included,
     the streamed loader by worker count, and ResNet-50's training rate on the GPU; so README can
     say how many workers per GPU an ImageNet run needs. Writes loader.md and loader.json.
  4. accuracy: one method (--method, default: the first of simsiam, byol, simclr, swav, directclr
     without an accuracy result in benchmarks/results/*/results.json) with its full default recipe
     for the largest of 200, 100, 50 epochs that fits the time left, by its epoch time measured in
     part 2 and the evaluation time measured here; kNN every 10 epochs and the final linear probe.

Files in --out (default $OUT, else ./gpu_check_out), rewritten after each part and each method,
so that a command stopped at its time limit keeps what it finished: report.md (device, torch,
date, command, one table per part), results.json (every number, machine-readable), log.txt
(everything printed, capped at 400 kB), metrics.jsonl (the accuracy run's; spectra kept only at
its first and last evaluation), knn.png (the accuracy run's kNN curve; needs matplotlib), and
part 5's loader.md and loader.json.
At --budget + 20 s the command interrupts itself and writes what it has.

The CIFAR-10 JPEGs are decoded once (in parallel processes, about 60k files) and every train()
gets that copy: the method modules' load_data is replaced by a memoized one here. Checkpoints are
not written (each would be a 150 MB write per epoch, and none would come back).
"""
import os
import sys

if "--dry-run" in sys.argv:  # before torch is imported: the dry run never touches a GPU
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import glob  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import multiprocessing  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import signal  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import zipfile  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import torch  # noqa: E402

import common  # noqa: E402
import throughput  # noqa: E402

METHODS = ("simsiam", "byol", "simclr", "swav", "directclr")
MODULES = {name: importlib.import_module(name) for name in METHODS}
EPOCH = 50_000  # images in a CIFAR-10 epoch
RESULTS = os.path.join(ROOT, "benchmarks", "results")
DATA_TMP = "/tmp/gpu_check_data"
GRACE = 20  # seconds past --budget before the command interrupts itself
LOG_CAP = 400_000  # bytes of log.txt; the rest goes to the screen only
PROFILE_SCHEDULE = dict(wait=1, warmup=2, active=2)  # steps: setup + first, warm-up, profiled
T0 = time.time()


# ===================================================================== output

def say(*parts):
    """A progress line with the elapsed time and the clock, flushed at once."""
    print(f"[{time.time() - T0:6.1f}s {time.strftime('%H:%M:%S')}]", *parts, flush=True)


class Tee:
    """Everything written to file descriptors 1 and 2 (this process, its children, C code) goes
    on to where it went (stdout, stderr) and into log.txt (up to LOG_CAP bytes), through a pipe
    and a thread for each."""

    def __init__(self, path):
        self.fh, self.size, self.lock = open(path, "ab"), 0, threading.Lock()
        sys.stdout.flush()
        sys.stderr.flush()
        self.saved, self.threads = {}, []
        for fd in (1, 2):
            self.saved[fd] = os.dup(fd)
            read_end, write_end = os.pipe()
            os.dup2(write_end, fd)
            os.close(write_end)
            t = threading.Thread(target=self.pump, args=(read_end, self.saved[fd]), daemon=True)
            t.start()
            self.threads.append(t)
        sys.stdout.reconfigure(line_buffering=True)

    def pump(self, read_end, screen):
        while True:
            try:
                chunk = os.read(read_end, 65536)
            except OSError:
                return
            if not chunk:
                return
            try:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(screen, view):]
            except OSError:  # the screen is gone: keep the log
                pass
            with self.lock:
                try:
                    if self.size < LOG_CAP:
                        part = chunk[:LOG_CAP - self.size]
                        self.size += len(part)
                        self.fh.write(part)
                        if self.size >= LOG_CAP:
                            self.fh.write(b"\n[log.txt ends here: the rest went to the screen]\n")
                        self.fh.flush()
                except OSError:
                    pass

    def close(self):
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, saved in self.saved.items():  # this process's write ends of the pipes close
            os.dup2(saved, fd)
        for t in self.threads:  # children still alive (compile workers) keep them open
            t.join(timeout=2)
        with self.lock:
            self.fh.close()


def finite(x):
    """JSON-safe: nan and inf become None."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


def write_atomic(path, text):
    with open(path + ".tmp", "w") as fh:
        fh.write(text)
    os.replace(path + ".tmp", path)


class Interrupted(BaseException):
    """SIGINT / SIGTERM outside train() (inside, common.setup's handler raises SystemExit)."""


def interrupted(e):
    """True for a stop from outside (time limit, SIGTERM, Ctrl-C), False for a crash."""
    return (isinstance(e, (Interrupted, KeyboardInterrupt))
            or (isinstance(e, SystemExit) and "interrupted (" in str(e.code)))


def error_line(e):
    """An exception's last line (type: first line of its message), and the message's own last
    line where it differs (where inductor puts the cause). At most 240 characters each."""
    if isinstance(e, SystemExit):  # common.fail's one line, or this script's own stop
        return str(e.code)[:400]
    lines = [s for s in str(e).strip().splitlines() if s.strip()]
    head = f"{type(e).__name__}: {lines[0] if lines else ''}".strip()[:240]
    if len(lines) > 1 and lines[-1].strip() not in head:
        head += " ... " + lines[-1].strip()[:240]
    return head


def attempt(what, fn, *a, **k):
    """fn(*a, **k) -> (value, None), or (None, the error line) after a crash; an interruption
    (time limit, SIGTERM) is not caught."""
    try:
        return fn(*a, **k), None
    except BaseException as e:  # noqa: B036 (common.fail raises SystemExit)
        if interrupted(e):
            raise
        line = error_line(e)
        say(f"{what} crashed: {line}")
        traceback.print_exc()
        e.__traceback__ = None
        del e
        free_memory()
        return None, line


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        try:
            torch.cuda.empty_cache()
        except RuntimeError as e:  # after a CUDA error the context may be gone: say, go on
            say(f"empty_cache: {error_line(e)}")


# ======================================================================= data

_DATA = {}  # (dataset, data_dir, image_size, device) -> common.Data
_LOAD_DATA = common.load_data


def cached_load_data(args, device):
    """common.load_data, decoded once per (dataset, image size) onto the CPU and moved once per
    device (every tensor field of common.Data moved, the rest recomputed as Data does)."""
    key = (args.dataset, os.path.abspath(args.data_dir), args.image_size)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0": one copy
        device = torch.device("cuda", torch.cuda.current_device())
    if (*key, "cpu") not in _DATA:
        _DATA[(*key, "cpu")] = read_data(args)
    if (*key, str(device)) not in _DATA:
        cpu = _DATA[(*key, "cpu")]
        moved = {f.name: getattr(cpu, f.name).to(device) for f in dataclasses.fields(cpu)
                 if isinstance(getattr(cpu, f.name), torch.Tensor)}
        _DATA[(*key, str(device))] = dataclasses.replace(cpu, **moved)
    return _DATA[(*key, str(device))]


def read_data(args):
    """The dataset on the CPU: a folder decoded by processes in parallel, else (or if that
    fails) common.load_data."""
    t = time.time()
    if args.dataset == "folder":
        data, err = attempt("parallel decoding", read_folder_parallel, args.data_dir,
                            args.image_size)
        if data is not None:
            say(f"decoded {len(data.ssl_x) + len(data.test_x)} images in "
                f"{time.time() - t:.1f} s (parallel)")
            return data
        say("falling back to common.load_data")
    data = _LOAD_DATA(args, "cpu")
    say(f"loaded {args.dataset} in {time.time() - t:.1f} s")
    return data


def _read_class(task):
    split_dir, name, size = task
    return common._read_all(common._list_split(split_dir, [name])[0], size)


def read_folder_parallel(root, size):
    """common.load_data's Data of a folder on the CPU (same files, order, decoding: its own
    _list_split and _read_all), one process per class and split instead of one thread pool in
    one process."""
    classes = sorted(d.name for d in os.scandir(os.path.join(root, "train")) if d.is_dir())
    test_dir = next(os.path.join(root, d) for d in ("test", "val")
                    if os.path.isdir(os.path.join(root, d)))
    tasks = [(os.path.join(root, "train"), c, size) for c in classes]
    tasks += [(test_dir, c, size) for c in classes]
    with ProcessPoolExecutor(min(len(tasks), os.cpu_count() or 1),
                             mp_context=multiprocessing.get_context("fork")) as pool:
        xs = list(pool.map(_read_class, tasks))

    def labelled(parts):
        y = torch.cat([torch.full((len(x),), c, dtype=torch.long) for c, x in enumerate(parts)])
        return common._resize(torch.cat(parts), size), y

    (x_tr, y_tr), (x_te, y_te) = labelled(xs[:len(classes)]), labelled(xs[len(classes):])
    return common.Data(x_tr, x_tr, y_tr, x_te, y_te, int(y_tr.max()) + 1)


def prepare_data(path):
    """A zip is unpacked to /tmp (once); returns the folder that holds train/ and test/ (or
    val/), searched two levels down."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--data {path}: no such file or folder")
    if zipfile.is_zipfile(path):
        base = os.path.splitext(os.path.basename(path))[0]
        dest = os.path.join(DATA_TMP, base)
        done = os.path.join(dest, ".unpacked")
        if not os.path.exists(done):
            t = time.time()
            with zipfile.ZipFile(path) as z:
                z.extractall(dest)
            open(done, "w").close()
            say(f"unpacked {path} to {dest} in {time.time() - t:.1f} s")
        path = dest
    for depth in range(3):
        for d in sorted(glob.glob(os.path.join(path, *["*"] * depth))):
            if (os.path.isdir(os.path.join(d, "train"))
                    and any(os.path.isdir(os.path.join(d, s)) for s in ("test", "val"))):
                return d
    raise FileNotFoundError(f"--data {path}: no folder with train/ and test/ (or val/) in it")


# ===================================================================== checks

class Check:
    """The command's state: options, results (as results.json has them) and the clock."""

    def __init__(self, opt):
        self.opt, self.dry, self.extra = opt, opt.dry_run, opt.extra
        self.cuda = torch.cuda.is_available() and not self.dry
        self.deadline = T0 + opt.budget
        self.R = {
            "script": "benchmarks/gpu_check.py", "device": None,
            "torch": torch.__version__, "cuda": torch.version.cuda if self.cuda else None,
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "python3 " + shlex.join(sys.argv), "dry_run": self.dry,
            "budget_s": opt.budget, "elapsed_s": 0.0, "finished": False, "stopped": None,
            "config": {}, "data": {"status": "not run"},
            "fullsize": {"status": "not run", "methods": {}},
            "throughput": {"status": "not run", "methods": {}, "conventional": None},
            "profile": {"status": "not run"}, "stages": {"status": "not run"},
            "loader": {"status": "not run"},
            "accuracy": {"status": "not run"}}
        size = dict(dataset="synthetic", arch="small", image_size=16, batch_size=32, steps=2,
                    workers=2) if self.dry else dict(dataset="folder", arch="resnet18",
                                                     image_size=32, batch_size=512, steps=20,
                                                     workers=min(8, os.cpu_count() or 1))
        for k in ("steps", "workers"):
            if getattr(opt, k) is not None:
                size[k] = getattr(opt, k)
        self.cfg = dict(size, data_dir="data", compile_backend="aot_eager (dry run)"
                        if self.dry else "inductor")
        self.R["config"] = self.cfg

    def describe_device(self):
        """The device's name (and memory): after the data is decoded, since it starts CUDA."""
        self.R["device"] = throughput.device_name()
        if self.cuda:
            self.R["device_memory_gib"] = round(
                torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1)
        say(f"device: {self.R['device']}, torch {torch.__version__}")

    def left(self):
        return self.deadline - time.time()

    def fits(self, seconds, what):
        """Is there time for `what` (seconds estimated)? Otherwise say so; the reason."""
        if self.left() >= seconds:
            return None
        reason = f"skipped: {self.left():.0f} s of the budget left, {seconds:.0f} s needed"
        say(f"{what}: {reason}")
        return reason

    def begin(self, part, seconds, what, **fields):
        """A part's results, as running, in R[part]; None (its status says why) when the
        estimated seconds do not fit the time left."""
        R = self.R[part] = {"status": "running", **fields}
        skip = self.fits(seconds, what)
        if skip:
            R["status"] = skip
            return None
        return R

    def save(self):
        """results.json, then report.md (a report that cannot be drawn says why; the numbers
        are in results.json all the same)."""
        self.R["elapsed_s"] = round(time.time() - T0, 1)
        out = self.opt.out
        write_atomic(os.path.join(out, "results.json"),
                     json.dumps(finite(self.R), indent=1) + "\n")
        try:
            text = report(self.R)
        except Exception as e:
            traceback.print_exc()
            text = f"# GPU check\n\nThe report could not be drawn ({error_line(e)}); the " \
                   f"numbers are in results.json.\n"
        write_atomic(os.path.join(out, "report.md"), text)

    def flags(self, batch_size=None):
        c = self.cfg
        return ["--dataset", c["dataset"], "--data-dir", c["data_dir"], "--arch", c["arch"],
                "--image-size", str(c["image_size"]),
                "--batch-size", str(batch_size or c["batch_size"])]


def train_method(name, flags):
    """The method's own train() with flags, in a temporary run folder; returns (the final
    record, the records of metrics.jsonl)."""
    m = MODULES[name]
    with tempfile.TemporaryDirectory(prefix=f"gpu_check_{name}_") as tmp:
        args = common.parse_args(m.Args, [*flags, "--out-dir", tmp])
        record = m.train(args)
        with open(os.path.join(record["run_dir"], "metrics.jsonl")) as fh:
            records = [json.loads(line) for line in fh]
    return record, records


def data_part(ck):
    """Unpack and decode the dataset once, before any run (and before CUDA is initialized, so
    that the decoding processes fork from a clean process)."""
    D = ck.R["data"] = {"status": "running"}
    t = time.time()
    if ck.dry:
        if ck.opt.data:
            D["checked"] = prepare_data(ck.opt.data)  # unpacked and found, not loaded
    else:
        if not ck.opt.data:
            raise SystemExit("error: --data <cifar10-jpeg.zip or its folder> is needed (or "
                             "--dry-run)")
        ck.cfg["data_dir"] = prepare_data(ck.opt.data)
    args = common.parse_args(MODULES["simsiam"].Args, ck.flags())
    data = cached_load_data(args, "cpu")
    D.update(status="done", dataset=ck.cfg["dataset"], root=ck.cfg["data_dir"],
             load_s=round(time.time() - t, 1), n_ssl=len(data.ssl_x), n_test=len(data.test_x),
             classes=data.num_classes)
    ck.save()


def method_run(ck, name, mode):
    """Parts 1 and 2 for one method in one mode, unless the time left is too short."""
    F = ck.R["fullsize"]["methods"].setdefault(name, {})
    T = ck.R["throughput"]["methods"].setdefault(name, {})
    walls = [r["compile"]["wall_s"] for r in ck.R["fullsize"]["methods"].values()
             if (r.get("compile") or {}).get("ok")]
    need = (20 if ck.dry else 30) if mode == "eager" else (
        60 if ck.dry else (1.5 * max(walls) if walls else 120))
    skip = ck.fits(need, f"{name} {mode}")
    if skip:
        F[mode] = {"ok": None, "error": skip}
        return
    F[mode], timed = timed_run(ck, name, mode, ck.cfg["batch_size"])
    if timed:
        T[mode] = timed


def timed_run(ck, name, mode, batch_size):
    """The method's own train() for 2 epochs of --steps steps, the second timed. Returns the
    part-1 record (ok, loss, peak memory or the error) and the part-2 one (None after a crash)."""
    say(f"=== {name} {mode}: 2 epochs of {ck.cfg['steps']} steps, batch {batch_size}")
    flags = [*ck.flags(batch_size), "--epochs", "2", "--steps-per-epoch", str(ck.cfg["steps"]),
             "--eval-every", "0", "--probe-epochs", "0", "--log-every", "1000000"]
    if mode == "compile":
        flags.append("--compile")
        torch._dynamo.reset()  # no recompile limit carried over from the other methods
    base = 0
    if ck.cuda:
        free_memory()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t = time.time()
    result, err = attempt(f"{name} {mode}", train_method, name, flags)
    wall = round(time.time() - t, 1)
    if mode == "compile":
        torch._dynamo.reset()
    peak = None
    if ck.cuda:
        try:
            peak = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
        except RuntimeError:  # the crash took the CUDA context with it
            pass
    if err is not None:
        return {"ok": False, "error": err, "wall_s": wall, "peak_mem_gib": peak}, None
    record, records = result
    loss, ips = record["loss"], record["img_per_s"]
    ok = math.isfinite(loss)
    say(f"{name} {mode}: loss {loss:.4f}, {ips:.0f} img/s, "
        f"peak {'-' if peak is None else f'{peak:.2f} GiB'}, {wall:.0f} s")
    return ({"ok": ok, "error": None if ok else f"loss {loss}", "loss": loss, "wall_s": wall,
             "peak_mem_gib": peak, "data_mem_gib": round(base / 2 ** 30, 2) if ck.cuda else None,
             "warmup_epoch_s": round(records[0]["epoch_s"], 2) if records else None},
            {"img_per_s": round(ips, 1), "epoch_s": round(EPOCH / ips, 2),
             "timed_epoch_s": round(record["epoch_s"], 3), "steps": ck.cfg["steps"],
             "batch_size": batch_size})


def conventional_part(ck):
    C = {"workers": ck.cfg["workers"]}
    skip = ck.fits(20 if ck.dry else 60, "conventional pipeline")
    if skip:
        C["error"] = skip
        ck.R["throughput"]["conventional"] = C
        return
    say(f"=== conventional pipeline: SimSiam, DataLoader with {ck.cfg['workers']} workers")
    ns = argparse.Namespace(dataset=ck.cfg["dataset"], data_dir=ck.cfg["data_dir"],
                            arch=ck.cfg["arch"], image_size=ck.cfg["image_size"],
                            batch_size=ck.cfg["batch_size"], steps_per_epoch=ck.cfg["steps"],
                            workers=ck.cfg["workers"], stream=False, skip_bad_images=False)
    t = time.time()
    ips, err = attempt("conventional pipeline", throughput.conventional_throughput, ns)
    free_memory()
    C.update(error=err, wall_s=round(time.time() - t, 1))
    if ips is not None:
        C.update(img_per_s=round(ips, 1), epoch_s=round(EPOCH / ips, 2))
        say(f"conventional: {ips:.0f} img/s")
    ck.R["throughput"]["conventional"] = C


def ratios(ck):
    """vs DataLoader: each method's img/s over the conventional pipeline's."""
    conv = (ck.R["throughput"]["conventional"] or {}).get("img_per_s")
    for modes in ck.R["throughput"]["methods"].values():
        for r in modes.values():
            r["vs_dataloader"] = round(r["img_per_s"] / conv, 2) if conv else None


# ==================================================================== profile

def profile_part(ck):
    P = ck.begin("profile", 20 if ck.dry else 45, "profile")
    if P is None:
        return
    from torch.profiler import ProfilerActivity, profile, schedule
    say("=== profile of SimSiam steps (eager)")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ck.cuda else [])
    m, steps = MODULES["simsiam"], sum(PROFILE_SCHEDULE.values())
    flags = [*ck.flags(), "--epochs", "1", "--steps-per-epoch", str(steps), "--eval-every", "0",
             "--probe-epochs", "0", "--log-every", "1000000"]
    original = m.log_step
    with tempfile.TemporaryDirectory(prefix="gpu_check_profile_") as tmp:
        with profile(activities=activities,
                     schedule=schedule(**PROFILE_SCHEDULE, repeat=1)) as prof:
            def log_step_then_mark(*a, **k):  # log_step ends every step of train()
                original(*a, **k)
                if ck.cuda:
                    torch.cuda.synchronize()  # the step's kernels inside its profiled range
                prof.step()
            m.log_step = log_step_then_mark
            try:
                train_method("simsiam", flags)
            finally:
                m.log_step = original
        trace = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(trace)
        with open(trace) as fh:
            events = json.load(fh)
        events = events["traceEvents"] if isinstance(events, dict) else events
        P.update(summarize_profile(events, prof.key_averages(), ck.cuda))
    P["status"] = "done"
    say(P["verdict"])


def summarize_profile(events, averages, cuda):
    """Per-step numbers of the profiled steps, from the Chrome trace (kernels, runtime calls,
    step ranges) and, on CPU, the operators' self time."""
    X = [e for e in events if e.get("ph") == "X"]
    step_ranges = [e for e in X if e.get("cat") == "user_annotation"
                   and str(e.get("name", "")).startswith("ProfilerStep#")]
    n = len(step_ranges) or PROFILE_SCHEDULE["active"]
    ms = lambda us: round(us / n / 1000, 3)  # noqa: E731  total microseconds -> ms per step
    cat = lambda *c: [e for e in X if e.get("cat") in c]  # noqa: E731
    step_us = sum(e["dur"] for e in step_ranges)
    ops = cat("cpu_op")
    P = {"device": "cuda" if cuda else "cpu", "steps": n, "step_ms": ms(step_us),
         "ops_per_step": round(len(ops) / n, 1)}
    if cuda:
        kernels, mem = cat("kernel"), cat("gpu_memcpy", "gpu_memset")
        runtime = cat("cuda_runtime", "cuda_driver")
        launches = [e for e in runtime if "launch" in e["name"].lower()]
        syncs = [e for e in runtime if "synchronize" in e["name"].lower()]
        kernel_us = sum(e["dur"] for e in kernels)
        sync_us = sum(e["dur"] for e in syncs)
        busy = (kernel_us + sum(e["dur"] for e in mem)) / step_us if step_us else 0.0
        P.update(kernel_ms=ms(kernel_us), memcpy_ms=ms(sum(e["dur"] for e in mem)),
                 host_ms=ms(step_us - sync_us), sync_wait_ms=ms(sync_us),
                 launch_ms=ms(sum(e["dur"] for e in launches)),
                 runtime_ms=ms(sum(e["dur"] for e in runtime)),
                 launches_per_step=round(len(launches) / n, 1),
                 kernels_per_step=round(len(kernels) / n, 1), gpu_busy=round(busy, 3))
        by_name = {}
        for e in kernels:
            total, count = by_name.get(e["name"], (0.0, 0))
            by_name[e["name"]] = (total + e["dur"], count + 1)
        top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:10]
        P["top"] = [{"name": k[:160], "ms_per_step": ms(t), "calls_per_step": round(c / n, 1)}
                    for k, (t, c) in top]
        if not kernels:
            P["verdict"] = "no kernel was recorded (CUPTI unavailable?): no verdict"
        elif busy >= 0.85:
            P["verdict"] = (f"GPU-bound: kernels keep the GPU busy {100 * busy:.0f}% of the "
                            f"{P['step_ms']:.1f} ms step")
        else:
            P["verdict"] = (f"host-bound: the GPU idles {100 * (1 - busy):.0f}% of the "
                            f"{P['step_ms']:.1f} ms step while the host issues "
                            f"{P['launches_per_step']:.0f} launches "
                            f"({P['launch_ms']:.1f} ms in launch calls)")
    else:
        rows = [a for a in averages if not a.key.startswith("ProfilerStep")]
        self_us = sum(a.self_cpu_time_total for a in rows)
        P.update(cpu_self_ms=ms(self_us), kernel_ms=None, launch_ms=None,
                 launches_per_step=None, gpu_busy=None)
        top = sorted(rows, key=lambda a: -a.self_cpu_time_total)[:10]
        P["top"] = [{"name": a.key[:160], "ms_per_step": ms(a.self_cpu_time_total),
                     "calls_per_step": round(a.count / n, 1)} for a in top]
        P["verdict"] = (f"CPU: {P['step_ms']:.1f} ms per step, {P['cpu_self_ms']:.1f} ms of it "
                        f"in operators' own time over {P['ops_per_step']:.0f} operator calls")
    return P


# ===================================================================== stages

STAGE_MODES = ("eager", "compiled", "CUDA graphs")


def stages_part(ck):
    """Part 3, second half: SimSiam's step cut into its three stages, each timed alone (mean of
    the timed calls after warm-up, synchronized): the two views (crop, augment, normalize), the
    networks' forward and backward (autocast, loss, gradients), the SGD update. Each eager,
    torch.compile'd as --compile does it (crop() and augment() each; f and h each) and, on
    CUDA, torch.compile'd with CUDA graphs (mode "reduce-overhead"): where compiling pays."""
    S = ck.begin("stages", 30 if ck.dry else 150, "stages", rows={})
    if S is None:
        return
    say("=== stages of the SimSiam step: eager, compiled, CUDA graphs")
    m, nn = MODULES["simsiam"], torch.nn
    args = common.parse_args(m.Args, ck.flags())
    device = torch.device("cuda" if ck.cuda else "cpu")
    data = cached_load_data(args, device)
    x = data.ssl_x[:args.batch_size]
    view = common.Recipe(size=args.image_size, scale=args.crop_scale, jitter=args.jitter,
                         jitter_p=args.jitter_p, gray_p=args.gray_p, blur_p=args.blur_p)
    encoder = common.backbone(args.arch, args.image_size, args.zero_init_residual)
    f = nn.Sequential(encoder, m.projector(encoder.dim, args.proj_dim, args.proj_layers))
    h = m.predictor(args.proj_dim, args.pred_hidden)
    f, h = f.to(device), h.to(device)
    if ck.cuda:  # as common.distribute
        f, h = f.to(memory_format=torch.channels_last), h.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD([*f.parameters(), *h.parameters()], lr=0.06, momentum=0.9,
                                weight_decay=5e-4, fused=ck.cuda or None)
    warmup, timed = (1, 2) if ck.dry else (3, 10)
    S.update(batch_size=args.batch_size, warmup=warmup, timed=timed)

    def views(r):
        return [data.normalize(common.augment(common.crop(x, r), r)) for _ in range(2)]

    x1, x2 = views(view)

    def networks(f, h):
        optimizer.zero_grad(set_to_none=True)
        with common.autocast(device):
            z1, z2 = f(x1), f(x2)
            p1, p2 = h(z1), h(z2)
        (m.D(p1, z2) / 2 + m.D(p2, z1) / 2).backward()

    def graphs(fn):  # CUDA graphs replay only between step marks
        return lambda: (torch.compiler.cudagraph_mark_step_begin(), fn())

    reduce = functools.partial(torch.compile, mode="reduce-overhead", dynamic=False)
    as_flag = dataclasses.replace(view, compile=True)  # what --compile gives the recipe
    cases = {  # stage -> mode -> () -> the call to time (made when its turn comes)
        "views": {"eager": lambda: functools.partial(views, view),
                  "compiled": lambda: functools.partial(views, as_flag),
                  "CUDA graphs": lambda: graphs(functools.partial(reduce(views), view))},
        "networks": {"eager": lambda: functools.partial(networks, f, h),
                     "compiled": lambda: functools.partial(networks, torch.compile(f),
                                                           torch.compile(h)),
                     "CUDA graphs": lambda: graphs(functools.partial(networks, reduce(f),
                                                                     reduce(h)))},
        "update": {"eager": lambda: (networks(f, h), optimizer.step)[1]}}  # eager gradients
    for stage, modes in cases.items():
        row = S["rows"].setdefault(stage, {})
        for mode in STAGE_MODES:
            if mode not in modes:
                continue
            if mode == "CUDA graphs" and not ck.cuda:
                row[mode] = {"error": "CUDA only"}
                continue
            if ck.left() < (5 if ck.dry else 45):
                row[mode] = {"error": f"skipped: {ck.left():.0f} s of the budget left"}
                continue
            torch._dynamo.reset()
            row[mode], err = attempt(f"{stage} {mode}", lambda: time_stage(
                modes[mode](), warmup, timed, ck.cuda))
            if err is not None:
                row[mode] = {"error": err}
            else:
                say(f"{stage} {mode}: {row[mode]['ms']:.2f} ms per call "
                    f"(first call {row[mode]['first_s']:.1f} s)")
            torch._dynamo.reset()
            free_memory()
            ck.save()
    S.update(summarize_stages(S["rows"], args.batch_size), status="done")
    say(S["verdict"])


def sync(cuda):
    """Wait for the GPU's queued work (nothing to wait for on a CPU)."""
    if cuda:
        torch.cuda.synchronize()


def time_stage(fn, warmup, timed, cuda):
    """ms per call of fn after warm-up (the first call, compilation included, timed apart)."""
    sync(cuda)
    t = time.perf_counter()
    fn()
    sync(cuda)
    first = time.perf_counter() - t
    for _ in range(warmup - 1):
        fn()
    sync(cuda)
    t = time.perf_counter()
    for _ in range(timed):
        fn()
    sync(cuda)
    return {"ms": round((time.perf_counter() - t) / timed * 1000, 3), "first_s": round(first, 1)}


def summarize_stages(rows, batch_size, margin=1.05):
    """Per stage the fastest mode and its gain over eager (a gain under margin is noise: eager
    stays); the step as the sum of the stages, eager and with each stage's chosen mode, in ms
    and in s per 50k-image epoch."""
    out, eager_ms, best_ms = {}, 0.0, 0.0
    for stage, row in rows.items():
        ok = {mode: r["ms"] for mode, r in row.items() if r.get("ms") is not None}
        if "eager" not in ok:
            return {"verdict": f"no verdict: the {stage} stage did not run eager"}
        best = min(ok, key=ok.get)
        if ok["eager"] / ok[best] < margin:
            best = "eager"
        out[stage] = {"best": best, "gain": round(ok["eager"] / ok[best], 2)}
        eager_ms, best_ms = eager_ms + ok["eager"], best_ms + ok[best]
    pays = [f"{stage} ({b['best']}, {b['gain']:.2f}x)" for stage, b in out.items()
            if b["best"] != "eager"]
    return {"best": out, "step_ms_eager": round(eager_ms, 3), "step_ms_best": round(best_ms, 3),
            "epoch_s_eager": round(EPOCH / batch_size * eager_ms / 1000, 2),
            "epoch_s_best": round(EPOCH / batch_size * best_ms / 1000, 2),
            "verdict": "compiling pays for " + (", ".join(pays) if pays else
                                                 f"no stage (by {margin:.2f}x or more)")}


# ===================================================================== loader

def loader_part(ck):
    """Part 5: benchmarks/loader.py here (its --quick form in a dry run), into --out."""
    L = ck.begin("loader", 30 if ck.dry else 100, "loader")
    if L is None:
        return
    import loader
    say("=== loader (benchmarks/loader.py)")
    workers = [str(w) for w in (1, 4, 8, 16) if w <= (os.cpu_count() or 1)]
    argv = ["--quick"] if ck.dry else ["--images", "256", "--seconds", "1.5",
                                       "--workers", *workers]
    r = loader.main([*argv, "--out", ck.opt.out])
    g = r["gpu_rate"] or {}  # none in a dry run: no GPU figure is assumed
    L.update(status="done", files=["loader.md", "loader.json"],
             gpu_img_per_s=g.get("img_per_s"), gpu_rate_source=g.get("source"),
             workers_per_gpu=r["workers_per_gpu"][0]["workers"] if g else None,
             decode_img_per_s=next(iter(r["decode"]["pil-draft"].values())))


# =================================================================== accuracy

def pick_method():
    """The first method without an accuracy result (not a dry run) in benchmarks/results."""
    done = set()
    for path in glob.glob(os.path.join(RESULTS, "*", "results.json")):
        try:
            with open(path) as fh:
                r = json.load(fh)
        except (OSError, ValueError):
            continue
        acc = r.get("accuracy") or {}
        if not r.get("dry_run") and acc.get("status") == "done" and acc.get("method"):
            done.add(acc["method"])
    return next((m for m in METHODS if m not in done), METHODS[0])


def accuracy_part(ck):
    method = ck.opt.method or pick_method()
    A = ck.R["accuracy"] = {"status": "running", "method": method}
    m = MODULES[method]
    flags = ["--dataset", ck.cfg["dataset"], "--data-dir", ck.cfg["data_dir"]]
    if ck.dry:
        flags += ["--arch", ck.cfg["arch"], "--image-size", str(ck.cfg["image_size"]),
                  "--batch-size", str(ck.cfg["batch_size"]), "--steps-per-epoch", "2",
                  "--probe-epochs", "2"]
    flags += ck.extra  # after --: e.g. --probe cached
    margs = common.parse_args(m.Args, flags)
    A.update(batch_size=margs.batch_size, probe=getattr(margs, "probe", "cached"),
             probe_epochs=margs.probe_epochs)
    say(f"=== accuracy: {method}, its default recipe (batch {margs.batch_size})")
    # the epoch time at the method's own batch size: part 2's, or measured now
    T = ck.R["throughput"]["methods"].get(method, {}).get("eager")
    if not T or T["batch_size"] != margs.batch_size:
        say(f"measuring {method}'s epoch time at batch {margs.batch_size}")
        _, T = timed_run(ck, method, "eager", margs.batch_size)
        A["timed_run"] = T
        if T is None:
            A["status"] = "skipped: no epoch time (its short timed run crashed, see log.txt)"
            return
    data = cached_load_data(margs, "cuda" if ck.cuda else "cpu")
    n_steps = common.steps_per_epoch(margs, len(data.ssl_x))
    epoch_s = n_steps * margs.batch_size / T["img_per_s"]
    eval_s, probe_s = time_evaluation(margs, data, ck)
    A.update(epoch_s_estimate=round(epoch_s, 2), eval_s=round(eval_s, 2),
             probe_s_estimate=round(probe_s, 1))

    def need(n):  # run set-up and first-epoch autotuning, epochs, evaluations, probe, margin
        return 1.1 * (15 + n * epoch_s + (n // 10 + 2) * eval_s + probe_s)

    if ck.dry:
        epochs = 2
    else:
        epochs = next((n for n in (200, 100, 50) if need(n) <= ck.left() - 5), None)
        if epochs is None:
            A["status"] = (f"skipped: not even 50 epochs fit: {need(50):.0f} s needed "
                           f"({epoch_s:.1f} s per epoch), {ck.left():.0f} s left")
            say(A["status"])
            return
    A.update(epochs=epochs, estimate_s=round(need(epochs), 1))
    ck.save()
    say(f"{method}: {epochs} epochs, about {need(epochs):.0f} s ({epoch_s:.1f} s per epoch, "
        f"evaluation {eval_s:.1f} s, probe about {probe_s:.0f} s); {ck.left():.0f} s left")
    run_flags = [*flags, "--epochs", str(epochs), "--eval-every", "10"]
    records, t = [], time.time()
    with tempfile.TemporaryDirectory(prefix="gpu_check_accuracy_") as tmp:
        args = common.parse_args(m.Args, [*run_flags, "--out-dir", tmp])
        try:
            record, err = attempt(f"accuracy {method}", m.train, args)
        except BaseException:  # noqa: B036 the time limit or SIGTERM: keep what it finished
            A["status"] = "stopped (time limit or signal) before the end"
            raise
        finally:
            A["wall_s"] = round(time.time() - t, 1)
            for path in glob.glob(os.path.join(tmp, "*", "metrics.jsonl")):
                with open(path) as fh:
                    records = [json.loads(line) for line in fh]
            write_metrics(records, os.path.join(ck.opt.out, "metrics.jsonl"))
            curve = [[r["epoch"], r["knn_top1"]] for r in records
                     if "knn_top1" in r and not r.get("final")]
            A.update(curve=curve, flags=run_flags, epochs_done=max(
                [r["epoch"] for r in records if "epoch" in r], default=0))
    free_memory()
    if err is not None:
        A.update(status="crashed", error=err)
    else:
        A.update(status="done", knn_top1=top1(record.get("knn_top1")),
                 linear_top1=top1(record.get("linear_top1")), loss=record.get("loss"))
        A["probe"] = record.get("linear_protocol") or A["probe"]
    if A["curve"]:  # a crashed run's too: the epochs it finished
        A["png"] = draw_curve(A, os.path.join(ck.opt.out, "knn.png"))
    if err is not None:
        return
    say(f"accuracy {method} {epochs} epochs: kNN {num(A['knn_top1'], '{:.2f}')}, linear "
        f"{num(A['linear_top1'], '{:.2f}')}, {A['wall_s']:.0f} s")


def top1(x):
    """An accuracy as a number (probe() returns a dict in some versions of common.py)."""
    if isinstance(x, dict):
        x = x.get("linear_top1")
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def time_evaluation(margs, data, ck):
    """Seconds of one evaluation (kNN, BN statistics of a fresh network measured) and of the
    final linear probe, whatever its protocol: common.probe timed with 1 and with 2 epochs, the
    difference scaled to --probe-epochs."""
    device = "cuda" if ck.cuda else "cpu"
    net = common.backbone(margs.arch, margs.image_size).to(device)
    t = time.time()
    common.evaluate(net, data, margs)
    sync(ck.cuda)
    eval_s = time.time() - t
    if margs.probe_epochs <= 0:
        return eval_s, 0.0
    secs = []
    for epochs in (1, 2):
        t = time.time()
        common.probe(net, data, dataclasses.replace(margs, probe_epochs=epochs))
        sync(ck.cuda)
        secs.append(time.time() - t)
    per_epoch = max(secs[1] - secs[0], 0.0)
    del net
    free_memory()
    return eval_s, max(secs[0], secs[0] - per_epoch + margs.probe_epochs * per_epoch)


def write_metrics(records, path):
    """The run's metrics.jsonl, its spectra kept only at the first and last evaluation (each is
    thousands of numbers; all of them would not fit the 1 MB the folder may hold)."""
    evaluated = [i for i, r in enumerate(records) if any(k.startswith("spectrum") for k in r)]
    keep = set(evaluated[:1] + evaluated[-2:])  # the last epoch's line and the final line
    with open(path, "w") as fh:
        for i, r in enumerate(records):
            if i not in keep:
                r = {k: v for k, v in r.items() if not k.startswith("spectrum")}
            fh.write(json.dumps(finite(r)) + "\n")


def draw_curve(A, path):
    """knn.png: kNN top-1 per evaluated epoch. Returns the file name, or a note without
    matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("matplotlib is missing: no knn.png")
        return None
    epochs, knn = zip(*A["curve"]) if A["curve"] else ((), ())
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    ax.plot(epochs, knn, "o-")
    lin = A.get("linear_top1")
    ax.set_title(f"{A['method']}, {A['epochs']} epochs, batch {A['batch_size']}: kNN top-1"
                 + ("" if lin is None or not math.isfinite(lin) else f" (linear {lin:.1f}%)"),
                 fontsize=10)
    ax.set_xlabel("epoch")
    ax.set_ylabel("kNN top-1 (%)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return os.path.basename(path)


# ===================================================================== report

def num(x, fmt="{:.0f}", none="-"):
    if not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x):
        return none
    return fmt.format(x)


def cell(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


def state(r):
    """One run's cell: ok, crashed (its error), skipped, not run."""
    if not r:
        return "not run"
    if r.get("ok"):
        return "ok"
    return cell(r.get("error") or "failed") if r.get("ok") is None else \
        f"**failed**: {cell(r.get('error'))}"


def report(R):
    c, D = R["config"], R["data"]
    lines = [f"# GPU check: {R['device'] or '(device not described yet)'}", "",
             f"torch {R['torch']}" + (f" (CUDA {R['cuda']})" if R.get("cuda") else "")
             + f", Python {R['python']}; {R['date']}. Command: `{R['command']}`", "",
             f"Budget {R['budget_s']:.0f} s, elapsed {R['elapsed_s']:.0f} s; "
             + ("finished." if R["finished"] else f"stopped: {R['stopped']}." if R["stopped"]
                else "running (a part was cut off where the results end).")]
    if R["dry_run"]:
        lines += ["", "**Dry run** on CPU: synthetic data, small backbone, 16 px, batch 32; "
                  "torch.compile with the aot_eager backend. The numbers test the script, "
                  "not a machine."]
    if D.get("status") == "done":
        where = "" if D["dataset"] == "synthetic" else f" from {D['root']}"
        lines += ["", f"Data: {D['dataset']}{where} ({D['n_ssl']} training, {D['n_test']} test "
                  f"images, {c['image_size']} px), decoded in {D['load_s']:.1f} s."]
    else:
        lines += ["", f"Data: {D.get('status')}"]
    F, T = R["fullsize"], R["throughput"]
    lines += ["", "## 1. Every method at full size", "",
              f"{c['arch']}, batch {c['batch_size']}, {c['image_size']} px, each method's "
              f"default recipe otherwise: its own train() for 2 epochs of {c['steps']} steps. "
              f"Loss: mean of the second epoch. Status: {F['status']}.", "",
              "| method | eager | loss | peak memory (GiB) | --compile | loss | "
              "peak memory (GiB) |", "|---|---|---|---|---|---|---|"]
    data_mem = None
    for name, modes in F["methods"].items():
        row = [name]
        for mode in ("eager", "compile"):
            r = modes.get(mode) or {}
            data_mem = data_mem or r.get("data_mem_gib")
            row += [state(r), num(r.get("loss"), "{:.4f}"), num(r.get("peak_mem_gib"), "{:.2f}")]
        lines.append("| " + " | ".join(row) + " |")
    if data_mem:
        lines += ["", f"Peak memory includes the dataset held on the GPU ({data_mem:.2f} GiB)."]
    conv = T.get("conventional") or {}
    lines += ["", "## 2. Throughput", "",
              "Images/s of the second epoch (source images, each seen as the method's views); "
              "s/epoch for 50,000 images. Status: " + T["status"] + ".", "",
              "| method | img/s eager | s/epoch | img/s --compile | s/epoch --compile | "
              "eager vs DataLoader | --compile vs DataLoader |", "|---|---|---|---|---|---|---|"]
    for name, modes in T["methods"].items():
        e, k = modes.get("eager") or {}, modes.get("compile") or {}
        lines.append(f"| {name} | {num(e.get('img_per_s'))} | {num(e.get('epoch_s'), '{:.1f}')} "
                     f"| {num(k.get('img_per_s'))} | {num(k.get('epoch_s'), '{:.1f}')} | "
                     f"{num(e.get('vs_dataloader'), '{:.2f}x')} | "
                     f"{num(k.get('vs_dataloader'), '{:.2f}x')} |")
    if conv:
        lines.append(f"| conventional (SimSiam, DataLoader, {conv['workers']} workers) | "
                     + (f"{num(conv.get('img_per_s'))} | {num(conv.get('epoch_s'), '{:.1f}')} "
                        f"| | | 1x | |" if conv.get("img_per_s") else
                        f"{cell(conv.get('error'))} | | | | | |"))
    P = R["profile"]
    lines += ["", "## 3. Profile of one SimSiam step (eager)", ""]
    if P.get("status") != "done":
        lines.append(f"Status: {cell(P.get('status'))}"
                     + (f" ({cell(P['error'])})" if P.get("error") else "") + ".")
    else:
        if P["device"] == "cuda":
            lines += [f"{P['steps']} steps after 3 (torch.profiler, CPU and CUDA activities, "
                      f"a synchronization at each step's end), per step: "
                      f"{P['step_ms']:.2f} ms; kernels {P['kernel_ms']:.2f} ms "
                      f"(memcpy/memset {P['memcpy_ms']:.2f} ms; GPU busy "
                      f"{100 * P['gpu_busy']:.0f}%); host {P['host_ms']:.2f} ms to issue the "
                      f"step, of which {P['launch_ms']:.2f} ms in {P['launches_per_step']:.0f} "
                      f"launch calls ({P['kernels_per_step']:.0f} kernels, "
                      f"{P['ops_per_step']:.0f} operator calls); waiting for the GPU "
                      f"{P['sync_wait_ms']:.2f} ms.", "", f"**{P['verdict']}.**", "",
                      "| kernel | device ms / step | calls / step |", "|---|---|---|"]
        else:
            lines += [f"{P['steps']} steps after 3 (torch.profiler, CPU activity), per step: "
                      f"{P['step_ms']:.2f} ms, operators' self time {P['cpu_self_ms']:.2f} ms, "
                      f"{P['ops_per_step']:.0f} operator calls.", "", f"**{P['verdict']}.**", "",
                      "| operator | self CPU ms / step | calls / step |", "|---|---|---|"]
        lines += [f"| `{cell(t['name'][:90])}` | {t['ms_per_step']:.3f} | "
                  f"{t['calls_per_step']:g} |" for t in P["top"]]
    lines += stages_report(R.get("stages") or {"status": "not run"})
    A = R["accuracy"]
    lines += ["", "## 4. Accuracy", ""]
    if A.get("epochs"):
        lines += [f"{A['method']}'s default recipe, its own train() with --epochs {A['epochs']} "
                  f"--eval-every 10 (kNN top-1, k 200; linear probe on frozen features at the "
                  f"end: {A.get('probe')}, {A.get('probe_epochs')} epochs). "
                  f"Epochs chosen by the time left: about {A.get('estimate_s', 0):.0f} s "
                  f"estimated ({A.get('epoch_s_estimate', 0):.1f} s per epoch, evaluation "
                  f"{A.get('eval_s', 0):.1f} s, probe about {A.get('probe_s_estimate', 0):.0f} s)."
                  f" Status: {cell(A['status'])}" + (f" ({cell(A['error'])})" if A.get("error")
                                                     else "") + ".", "",
                  "| method | epochs | batch | kNN top-1 | linear top-1 | wall time |",
                  "|---|---|---|---|---|---|",
                  f"| {A['method']} | {A.get('epochs_done', 0)} / {A['epochs']} | "
                  f"{A['batch_size']} | {num(A.get('knn_top1'), '{:.2f}')} | "
                  f"{num(A.get('linear_top1'), '{:.2f}')} | "
                  f"{common.hms(A.get('wall_s') or 0)} |", ""]
        if A.get("curve"):
            lines.append("kNN top-1 by epoch: " + ", ".join(f"{e}: {k:.1f}"
                                                           for e, k in A["curve"]))
        if A.get("png"):
            lines += ["", f"![kNN top-1 of the accuracy run]({A['png']})"]
        elif A.get("status") == "done":
            lines += ["", "No knn.png: matplotlib is missing."]
    else:
        lines.append(f"Status: {cell(A.get('status'))}" + (f" ({A['method']})" if
                                                          A.get("method") else "") + ".")
    L = R.get("loader") or {"status": "not run"}
    lines += ["", "## 5. Loader (benchmarks/loader.py)", ""]
    if L.get("status") == "done":
        lines.append(f"Tables in [loader.md](loader.md). One worker decodes "
                     f"{L['decode_img_per_s']:.0f} images/s into SimSiam's two crops"
                     + (f"; the GPU trains ResNet-50 at {L['gpu_img_per_s']:.0f} images/s "
                        f"({cell(L['gpu_rate_source'])}): workers per GPU "
                        f"{L['workers_per_gpu']}." if L["gpu_img_per_s"] else
                        "; no GPU rate measured."))
    else:
        lines.append(f"Status: {cell(L.get('status'))}"
                     + (f" ({cell(L['error'])})" if L.get("error") else "") + ".")
    return "\n".join(lines) + "\n"


def stages_report(S):
    lines = ["", "### The step's stages alone: eager, compiled, CUDA graphs", ""]
    if S.get("status") != "done":
        return lines + [f"Status: {cell(S.get('status'))}"
                        + (f" ({cell(S['error'])})" if S.get("error") else "") + "."]
    lines += [f"SimSiam at batch {S['batch_size']}: ms per call, mean of {S['timed']} calls "
              f"after {S['warmup']} (the first, compilation included, in seconds). views: crop, "
              f"augment and normalize both views; networks: f and h forward and backward "
              f"(autocast, loss); update: SGD. compiled: as --compile (crop(), augment(), f, h "
              f"each torch.compile'd); CUDA graphs: torch.compile mode reduce-overhead.", "",
              "| stage | " + " | ".join(STAGE_MODES) + " | fastest |",
              "|---|" + "---|" * (len(STAGE_MODES) + 1)]
    best = S.get("best") or {}
    for stage, row in S["rows"].items():
        cells = []
        for mode in STAGE_MODES:
            r = row.get(mode)
            cells.append("" if r is None else cell(r["error"]) if r.get("error") else
                         f"{r['ms']:.2f} ({r['first_s']:.1f} s)")
        b = best.get(stage)
        cells.append(f"{b['best']} ({b['gain']:.2f}x)" if b else "")
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    if S.get("step_ms_eager") is not None:
        lines += ["", f"The stages summed: {S['step_ms_eager']:.1f} ms eager "
                  f"({S['epoch_s_eager']:.2f} s per 50k-image epoch), {S['step_ms_best']:.1f} ms "
                  f"with each stage's fastest mode ({S['epoch_s_best']:.2f} s)."]
    return lines + ["", f"**{S['verdict']}.**"]


# ======================================================================= main

def parse(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    argv, extra = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (
        argv, [])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", help="the CIFAR-10 JPEG zip (unpacked to /tmp) or its folder; "
                   "needed unless --dry-run")
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out",
                   help="output folder (default: $OUT if set, else ./gpu_check_out)")
    p.add_argument("--budget", type=float, default=540,
                   help="seconds for the whole command; each part checks the clock")
    p.add_argument("--method", choices=METHODS,
                   help="part 4's method (default: the first without an accuracy result in "
                        "benchmarks/results/*/results.json)")
    p.add_argument("--parts", type=int, nargs="+", default=[1, 2, 3, 4, 5],
                   choices=[1, 2, 3, 4, 5],
                   help="which parts to run (e.g. a second call: --parts 4 --method byol)")
    p.add_argument("--steps", type=int, help="steps of each of the 2 epochs of parts 1-2 "
                   "(default: 20; dry run 2)")
    p.add_argument("--workers", type=int, help="DataLoader workers of the conventional pipeline "
                   "(default: min(8, cores); dry run 2)")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU only: synthetic data, small backbone, 16 px, batch 32, a few steps")
    opt = p.parse_args(argv)
    opt.extra = extra
    return opt


def main():
    opt = parse()
    os.makedirs(opt.out, exist_ok=True)
    for name in ("report.md", "results.json", "log.txt", "metrics.jsonl", "knn.png",
                 "loader.md", "loader.json"):
        if os.path.exists(os.path.join(opt.out, name)):  # nothing of an earlier run mixes in
            os.remove(os.path.join(opt.out, name))
    tee = Tee(os.path.join(opt.out, "log.txt"))
    ck = Check(opt)
    R, parts = ck.R, set(opt.parts)
    say(f"gpu_check: {ck.R['command']}")
    for m in MODULES.values():  # load once (memoized), write no checkpoints
        m.load_data = cached_load_data
        m.save_checkpoint = lambda *a, **k: None
    common.load_data = cached_load_data  # throughput.conventional_throughput's
    if ck.dry:
        torch.compile = functools.partial(torch.compile, backend="aot_eager")

    def stop(signum, frame):
        raise Interrupted(signal.Signals(signum).name)

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, stop)

    def time_is_up():
        say(f"--budget {opt.budget:.0f} s + {GRACE} s passed: interrupting")
        R["stopped"] = f"time limit (--budget {opt.budget:.0f} s + {GRACE} s)"
        os.kill(os.getpid(), signal.SIGINT)

    watchdog = threading.Timer(opt.budget + GRACE - (time.time() - T0), time_is_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        ck.save()
        if not ck.dry and not ck.cuda:  # full size on a CPU would only run out the budget
            _, why = attempt("CUDA", torch.cuda.init)
            raise SystemExit(f"no CUDA device: torch.cuda.is_available() is False (torch "
                             f"{torch.__version__}, built for CUDA {torch.version.cuda}"
                             + (f"; {why}" if why else "") + "); --dry-run runs on a CPU")
        _, err = attempt("data", data_part, ck)
        if err is not None:
            R["data"].update(status=f"failed: {err}")
            raise SystemExit(f"error: no data: {err.removeprefix('error: ')}")
        ck.describe_device()
        ck.save()
        runs = parts & {1, 2}
        if runs:
            R["fullsize"]["status"] = R["throughput"]["status"] = "running"
            for name in METHODS:
                method_run(ck, name, "eager")
                ck.save()
        if 2 in parts:
            conventional_part(ck)
            ratios(ck)
            ck.save()
        if 3 in parts:
            _, err = attempt("profile", profile_part, ck)
            if err is not None:
                R["profile"].update(status="crashed", error=err)
            ck.save()
            _, err = attempt("stages", stages_part, ck)
            if err is not None:
                R["stages"].update(status="crashed", error=err)
            ck.save()
        if runs:
            for name in METHODS:
                method_run(ck, name, "compile")
                ratios(ck)
                ck.save()
            R["fullsize"]["status"] = R["throughput"]["status"] = "done"
            ck.save()
        if 5 in parts:
            _, err = attempt("loader", loader_part, ck)
            if err is not None:
                R["loader"].update(status="crashed", error=err)
            ck.save()
        if 4 in parts:
            _, err = attempt("accuracy", accuracy_part, ck)
            if err is not None:
                R["accuracy"].update(status="crashed", error=err)
            ck.save()
        R["finished"] = True
    except BaseException as e:  # noqa: B036 the time limit, SIGTERM, no data, or a bug here
        signal_name = re.search(r"interrupted \((\w+)\)", str(getattr(e, "code", "")))
        if signal_name:
            reason = f"interrupted ({signal_name.group(1)})"
        elif isinstance(e, (Interrupted, KeyboardInterrupt)):
            reason = f"interrupted ({e})" if str(e) else "interrupted"
        else:
            reason = error_line(e)
            if not isinstance(e, SystemExit):
                traceback.print_exc()
        R["stopped"] = R["stopped"] or reason
        say(f"stopped: {R['stopped']}")
    finally:
        watchdog.cancel()
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)  # the files are written whole
        ck.save()
        files = sorted(os.listdir(opt.out))
        size = sum(os.path.getsize(os.path.join(opt.out, f)) for f in files)
        say(f"done in {time.time() - T0:.0f} s: {opt.out}: {', '.join(files)} ({size} bytes)")
        tee.close()
    if R["stopped"]:  # no wait for what a cut-off part left running (compile workers, loaders)
        os._exit(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

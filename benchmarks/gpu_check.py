"""Correctness where users train: FSDP on the GPU(s) at hand. Run it when a GPU is lent, never in tests.

    python benchmarks/gpu_check.py [--devices 2] [--precision 32-true] [--work DIR]
    python benchmarks/gpu_check.py --accelerator cpu --strategy ddp --devices 2   # the same checks on CPU

Every step is the ``midtrain`` CLI in a subprocess, as a user runs it (FSDP by default):

1. ``pretrain`` from scratch, 4 steps, validation at steps 0 and 4 (the source run);
2. ``pretrain --initial_checkpoint_dir source/final`` (litgpt's plain weights) and from
   ``source/step-00000004`` (a full FSDP checkpoint): the step-0 validation loss equals the source's
   step-4 loss, i.e. the weights were loaded after ``fabric.setup``, not into a meta model;
3. ``finetune`` from the source checkpoint: its step-0 loss on the same validation shard equals the
   source's;
4. resume: 2 steps, then the same command with ``max_additional_steps 4`` gives the source's losses
   at steps 3 and 4; submitted once more it trains nothing;
5. ``final/`` opens in ``litgpt generate`` and ``litgpt convert_from_litgpt``;
6. preemption: ``kill -TERM`` of a running ``pretrain`` exits 75 with a checkpoint; the rerun ends at the
   same step with the source's losses and logs each step once;
7. compile verified: ``compile: true`` leaves generated kernels in the inductor cache (not just requested);
   ``finetune`` with compile logs its recompiles (``TORCH_LOGS=recompiles``), counted in the table;
8. ``litgpt pretrain`` vs ``midtrain pretrain`` on pythia-160m (``benchmarks/pretrain.py``, one round):
   tokens/s and MFU (one formula for both), side by side.

Peak host RSS (of any command so far) and peak GPU memory (``nvidia-smi``, polled) are in the table.
bf16-mixed by default; every command has a timeout (``--timeout``) and the whole check a budget
(``--budget``, 7 minutes: the sections left when it runs out are reported as skipped), so it fits 8
minutes of one H100. ``--dry-run`` (no GPU needed) writes every config and checks that the CLI parses it.

On one GPU, ``--strategy fsdp`` (the default) still runs FSDP (meta-device model, weights loaded after
setup); several GPUs also shard. Prints one table (check, expected, got, PASS/FAIL) and exits 1 if any
check fails; the logs of every command stay in the work directory when ``--work`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MODEL = {"name": "gpu-check", "n_layer": 2, "n_head": 4, "n_embd": 128, "block_size": 128, "vocab_size": 512,
         "padded_vocab_size": 512}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=None, help="processes/GPUs (default: every visible GPU, >= 1)")
    parser.add_argument("--accelerator", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--strategy", default="fsdp", choices=["fsdp", "ddp", "auto"])
    parser.add_argument("--precision", default="bf16-mixed", help="bf16-mixed (default) or 32-true (tighter)")
    parser.add_argument("--rel", type=float, default=None, help="relative tolerance (default: 1e-4, 2e-2 for bf16)")
    parser.add_argument("--work", type=Path, default=None, help="working directory (default: a temporary one)")
    parser.add_argument("--timeout", type=int, default=150, help="seconds per command")
    parser.add_argument("--budget", type=int, default=420, help="seconds for the whole check")
    parser.add_argument("--dry-run", action="store_true", help="write the configs and parse them; run nothing")
    parser.add_argument("--bench-model", default="pythia-160m", help="model of the litgpt vs midtrain comparison")
    return parser.parse_args()


def write_world(root: Path) -> dict[str, Path]:
    """Shards (random tokens), a validation shard, a word-level tokenizer and an SFT JSON set."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: tests/ holds the shard writer
    from tests.synthetic import write_tree  # noqa: E402

    write_tree(root / "data", {"1": 400_000, "c1": 200_000}, vocab_size=MODEL["vocab_size"], chunk_tokens=1 << 15)
    write_tree(root / "val", {"1": 40_000}, vocab_size=MODEL["vocab_size"], chunk_tokens=1 << 15)
    records = [{"instruction": f"what is {k % 7} plus {k % 5} ?", "input": "", "output": f"it is {k % 7 + k % 5} ."}
               for k in range(64)]
    (root / "sft").mkdir(parents=True, exist_ok=True)
    (root / "sft" / "train.json").write_text(json.dumps(records[:48]))
    (root / "sft" / "val.json").write_text(json.dumps(records[48:]))
    tok_dir = root / "tok"
    tok_dir.mkdir(exist_ok=True)
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    texts = [f"{r['instruction']} {r['output']} Below is an instruction Instruction Response ### :" for r in records]
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    tok.save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "tokenizer_class": "PreTrainedTokenizerFast"}
    ))
    return {"data": root / "data", "val": root / "val" / "1", "sft": root / "sft", "tok": tok_dir}


class Checker:
    def __init__(self, args: argparse.Namespace, root: Path, world: dict[str, Path]) -> None:
        self.args, self.root, self.world = args, root, world
        self.rows: list[tuple[str, str, str, bool]] = []
        self.common = {"precision": args.precision, "accelerator": args.accelerator, "devices": args.devices,
                       "strategy": args.strategy, "compile": False}
        self.began = time.perf_counter()
        self.gpu_peak_mib = 0.0

    def over_budget(self, section: str) -> bool:
        if time.perf_counter() - self.began < self.args.budget:
            return False
        self.check(section, "run", "skipped: --budget spent", False)
        return True

    def write(self, cfg: dict, name: str) -> Path:
        import yaml

        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**self.common, **cfg}))
        return path

    def command(self, argv: list[str], name: str, env: dict | None = None) -> subprocess.CompletedProcess:
        """Run ``argv`` with the per-command timeout, polling GPU memory; its log goes to ``name.log``."""
        started = time.perf_counter()
        with GpuMemory() as gpu:
            try:
                proc = subprocess.run(argv, capture_output=True, text=True, timeout=self.args.timeout,
                                      env={**os.environ, **(env or {})})
            except subprocess.TimeoutExpired as err:
                proc = subprocess.CompletedProcess(argv, 124, str(err.stdout or ""), f"timeout {self.args.timeout} s")
        self.gpu_peak_mib = max(self.gpu_peak_mib, gpu.peak_mib)
        (self.root / f"{name}.log").write_text(proc.stdout + proc.stderr)
        print(f"  {name}: exit {proc.returncode} in {time.perf_counter() - started:.0f} s "
              f"(log {self.root / f'{name}.log'})", flush=True)
        return proc

    def midtrain(self, command: str, cfg: dict, name: str, *extra: str, env: dict | None = None
                 ) -> subprocess.CompletedProcess:  # fmt: skip
        path = self.write(cfg, name)
        if self.args.dry_run:
            return parse_only(command, path, list(extra), name)
        return self.command([sys.executable, "-m", "midtrain", command, "--config", str(path), *extra], name, env)

    def pretrain_cfg(self, out: str, **extra) -> dict:
        cfg = {
            "model_config": MODEL, "out_dir": str(self.root / out), "tokenizer_dir": str(self.world["tok"]),
            "data": {"class_path": "midtrain.data.ShardedMixedDataset",
                     "init_args": {"data_path": str(self.world["data"]), "mix_weights_str": "main:0.7,code:0.3",
                                   "val_data_path": {"v": str(self.world["val"])}, "num_workers": 1}},
            "train": {"max_steps": 4, "global_batch_size": 8 * self.args.devices, "micro_batch_size": 4,
                      "save_interval": 2, "lr_warmup_steps": 1},
            "eval": {"interval": 1000, "max_samples": 64, "initial_validation": True, "final_validation": True},
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 3e-3}},
        }
        cfg.update(extra)
        return cfg

    def check(self, name: str, expected: str, got: str, ok: bool) -> None:
        self.rows.append((name, expected, got, bool(ok)))

    def close(self, name: str, got: float | None, want: float | None) -> None:
        rel = self.args.rel or (2e-2 if "bf16" in self.args.precision or "16" in self.args.precision else 1e-4)
        ok = got is not None and want is not None and abs(got - want) <= rel * abs(want)
        self.check(name, f"{want!s:.10} (rel {rel:g})", f"{got!s:.10}", ok)

    def ran(self, name: str, proc: subprocess.CompletedProcess) -> bool:
        ok = proc.returncode == 0 and "is a no-op" not in proc.stdout + proc.stderr
        if not ok:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
            self.check(name, "exit 0, no meta-device no-op warning", f"exit {proc.returncode}: {' | '.join(tail)}",
                       False)
        return ok


class GpuMemory:
    """Peak ``memory.used`` of GPU 0 (MiB) while the block runs, polled by ``nvidia-smi`` every half second."""

    def __enter__(self) -> GpuMemory:
        self.peak_mib, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                      "-i", "0"], capture_output=True, text=True, timeout=5).stdout
                self.peak_mib = max(self.peak_mib, float(out.split()[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                return
            self._stop.wait(0.5)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=6)


def parse_only(command: str, config: Path, extra: list[str], name: str) -> subprocess.CompletedProcess:
    """--dry-run: parse the config as ``midtrain <command>`` would (types, classes, paths), run nothing."""
    from midtrain import cli

    fn = cli._load(cli.COMMANDS[command][0])
    args = cli._prepare_args(command, fn, cli._repeatable_lists(fn, ["--config", str(config), *extra]))
    try:
        cli._parser(fn, f"midtrain {command}").parse_args(args)
        print(f"  {name}: {command} config parses", flush=True)
        return subprocess.CompletedProcess([command], 0, "", "")
    except Exception as err:  # noqa: BLE001 - reported as a failed row
        return subprocess.CompletedProcess([command], 2, "", str(err).splitlines()[0])


def metric(out: Path, key: str, step: int) -> float | None:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    found = [r[key] for r in rows if r.get("step") == step and key in r]
    return found[-1] if found else None


def run_checks(c: Checker) -> None:
    root, val = c.root, "val/v/loss"
    source = root / "source"
    if not c.ran("pretrain from scratch", c.midtrain("pretrain", c.pretrain_cfg("source"), "source")):
        return
    if c.args.dry_run:
        for command, cfg, name in dry_run_configs(c):
            c.ran(f"{name}: config parses", c.midtrain(command, cfg, name))
        return
    trained = metric(source, val, 4)
    c.check("source run: loss moved in 4 steps", "step 0 != step 4", f"{metric(source, val, 0)} -> {trained}",
            trained is not None and metric(source, val, 0) != trained)

    for tag, start in (("final", source / "final"), ("step", source / "step-00000004")):
        out = f"init-{tag}"
        proc = c.midtrain("pretrain", c.pretrain_cfg(out, initial_checkpoint_dir=str(start)), out)
        if c.ran(f"pretrain --initial_checkpoint_dir {start.name}", proc):
            c.close(f"initial_checkpoint_dir {start.name}: step-0 val loss", metric(root / out, val, 0), trained)

    ft_cfg = {
        "checkpoint_dir": str(source / "step-00000004"), "out_dir": str(root / "ft"),
        "data": {"class_path": "litgpt.data.JSON",
                 "init_args": {"json_path": str(c.world["sft"]), "mask_prompt": True, "num_workers": 0}},
        "val_data_path": {"v": str(c.world["val"])},
        "train": {"max_steps": 2, "global_batch_size": 4 * c.args.devices, "micro_batch_size": 4,
                  "max_seq_length": MODEL["block_size"], "save_interval": None},
        "eval": {"interval": 1000, "max_samples": 64, "initial_validation": True},
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3}},
    }
    if c.ran("finetune", c.midtrain("finetune", ft_cfg, "ft")):
        c.close("finetune from step-00000004: step-0 val loss", metric(root / "ft", val, 0), trained)
        c.check("finetune wrote final/", "final/COMPLETE", str((root / "ft" / "final" / "COMPLETE").is_file()),
                (root / "ft" / "final" / "COMPLETE").is_file())

    parts = c.pretrain_cfg("parts")
    if c.ran("resume: first part", c.midtrain("pretrain", parts, "parts-1", "--train.max_additional_steps", "2")):
        if c.ran("resume: second part", c.midtrain("pretrain", parts, "parts-2", "--train.max_additional_steps", "4")):
            for step in (3, 4):
                c.close(f"resumed run: loss at step {step}", metric(root / "parts", "loss", step),
                        metric(source, "loss", step))
            again = c.midtrain("pretrain", parts, "parts-3", "--train.max_additional_steps", "4")
            c.check("finished run resubmitted", "trains nothing and says so",
                    f"exit {again.returncode}", again.returncode == 0 and "already finished" in again.stdout)

    if not c.over_budget("preemption"):
        check_preemption(c, source)
    if not c.over_budget("compile"):
        check_compile(c, ft_cfg)
    if not c.over_budget("litgpt vs midtrain pretrain"):
        compare_throughput(c)
    litgpt = [sys.executable, "-c", "from litgpt.__main__ import main; main()"]
    final = source / "final"
    gen = subprocess.run([*litgpt, "generate", str(final), "--prompt", "what is 1 plus 2 ?", "--max_new_tokens", "5",
                          "--precision", "32-true"], capture_output=True, text=True, timeout=c.args.timeout)
    c.check("litgpt generate final/", "exit 0", f"exit {gen.returncode}", gen.returncode == 0)
    conv = subprocess.run([*litgpt, "convert_from_litgpt", str(final), str(root / "hf")], capture_output=True,
                          text=True, timeout=c.args.timeout)
    c.check("litgpt convert_from_litgpt final/", "exit 0 and model.pth", f"exit {conv.returncode}",
            conv.returncode == 0 and (root / "hf" / "model.pth").is_file())


def check_preemption(c: Checker, source: Path) -> None:  # noqa: ARG001
    """SIGTERM (SLURM's preemption signal) to a running pretrain's process group: exit 75 and a checkpoint; the rerun
    continues from it to its end step, logging each step once."""
    from midtrain.rundir import find_latest, read_train_state

    out = c.root / "preempt"
    cfg = c.pretrain_cfg("preempt", train={**c.pretrain_cfg("x")["train"], "save_interval": None, "log_interval": 1})
    path = c.write({**cfg, "train": {**cfg["train"], "max_steps": 100_000}}, "preempt-1")
    with open(c.root / "preempt-1.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "midtrain", "pretrain", "--config", str(path)], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        deadline = time.perf_counter() + c.args.timeout
        while proc.poll() is None and time.perf_counter() < deadline and len(logged(out)) < 3:
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            code = proc.wait(timeout=c.args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            code = -9
    latest = find_latest(out)
    state = read_train_state(latest) if latest else {}
    c.check("SIGTERM: exit status, checkpoint", "75, preempted", f"{code}, {state.get('reason')}",
            code == 75 and state.get("reason") == "preempted")
    if not state:
        return
    end = int(state["step"]) + 2
    rerun = c.midtrain("pretrain", {**cfg, "train": {**cfg["train"], "max_steps": end}}, "preempt-2")
    if c.ran("SIGTERM: rerun", rerun):
        steps = logged(out)
        c.check("SIGTERM: rerun ends at its step, each step once", f"1..{end}", f"{steps[:2]}..{steps[-1:]}",
                steps == list(range(1, end + 1)))


def logged(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")] if path.is_file() else []
    return [r["step"] for r in rows if "loss" in r]


def check_compile(c: Checker, ft_cfg: dict) -> None:
    """compile: true really compiles (inductor writes kernels) and finetune's recompiles are counted."""
    cache = c.root / "inductor-cache"
    env = {"TORCHINDUCTOR_CACHE_DIR": str(cache), "TORCH_LOGS": "recompiles"}
    cfg = {**ft_cfg, "out_dir": str(c.root / "ft-compiled"), "compile": True}
    proc = c.midtrain("finetune", cfg, "ft-compiled", env=env)
    if c.ran("finetune, compile: true", proc):
        kernels = len(list(cache.rglob("*.py"))) if cache.is_dir() else 0
        c.check("compile verified (inductor kernels written)", "> 0 files", str(kernels), kernels > 0)
        recompiles = (proc.stdout + proc.stderr).count("Recompiling function")
        c.check("finetune recompiles (TORCH_LOGS=recompiles)", "logged (<= 8)", str(recompiles), recompiles <= 8)


def compare_throughput(c: Checker) -> None:
    """benchmarks/pretrain.py, one round: litgpt pretrain vs midtrain pretrain tokens/s and MFU."""
    if c.args.accelerator != "cuda":
        return
    bench = Path(__file__).with_name("pretrain.py")
    proc = c.command([sys.executable, str(bench), "--model", c.args.bench_model, "--device", "cuda", "--precision",
                      c.args.precision, "--rounds", "1", "--steps", "25", "--warmup", "5", "--micro_batch_size", "4"],
                     "throughput")  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if "pretrain" in ln and ("MFU" in ln or "x   " in ln)]
    for line in lines:
        print("  " + line)
    c.check(f"litgpt vs midtrain pretrain ({c.args.bench_model})", "tokens/s + MFU both", f"{len(lines)} lines",
            proc.returncode == 0 and len(lines) >= 4)


def dry_run_configs(c: Checker) -> list[tuple[str, dict, str]]:
    """Every other config the check runs (the dry run parses them)."""
    ft = {"checkpoint_dir": str(c.world["tok"]), "out_dir": str(c.root / "ft"),
          "data": {"class_path": "litgpt.data.JSON", "init_args": {"json_path": str(c.world["sft"])}},
          "train": {"max_steps": 2, "global_batch_size": 4, "micro_batch_size": 4}}  # fmt: skip
    return [("pretrain", c.pretrain_cfg("init", initial_checkpoint_dir=str(c.world["tok"])), "init"),
            ("pretrain", c.pretrain_cfg("preempt"), "preempt"), ("finetune", ft, "ft"),
            ("finetune", {**ft, "compile": True}, "ft-compiled")]


def main() -> int:
    args = parse_args()
    import torch

    if args.accelerator == "cuda" and not torch.cuda.is_available() and not args.dry_run:
        print("gpu_check: no CUDA device here; use --accelerator cpu --strategy ddp for the CPU variant.")
        return 2
    if args.devices is None:
        args.devices = max(torch.cuda.device_count(), 1) if args.accelerator == "cuda" else 2
    with tempfile.TemporaryDirectory() as tmp:
        root = (args.work or Path(tmp)).resolve()
        root.mkdir(parents=True, exist_ok=True)
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (dry run)"
        print(f"gpu_check: {args.devices} x {device}, strategy {args.strategy}, precision {args.precision}, "
              f"torch {torch.__version__}; work dir {root}", flush=True)
        checker = Checker(args, root, write_world(root))
        run_checks(checker)
    import resource

    host_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    checker.check("peak host RSS (one command)", "reported", f"{host_mib:,.0f} MiB", True)
    if args.accelerator == "cuda":
        checker.check("peak GPU memory (nvidia-smi)", "reported", f"{checker.gpu_peak_mib:,.0f} MiB", True)
    print(f"total {time.perf_counter() - checker.began:.0f} s")
    width = max(len(r[0]) for r in checker.rows)
    print(f"\n{'check':<{width}}  {'expected':<28}  {'got':<28}  result")
    for name, expected, got, ok in checker.rows:
        print(f"{name:<{width}}  {expected:<28}  {got:<28}  {'PASS' if ok else 'FAIL'}")
    failed = sum(not ok for *_, ok in checker.rows)
    print(f"\n{len(checker.rows) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Train-step throughput of maskedlm against transformers' BERT and ModernBERT, side by side in one process.

Every system runs the same step (forward, backward, AdamW step) on the same masked batches at the same shape, in
interleaved rounds after a warm-up, so machine noise hits all of them alike. Prints tokens/s (median over rounds),
ratios between systems, achieved GFLOP/s against bf16/fp32 matmul peaks measured in the same rounds, peak memory, and
the ceiling: each maskedlm system's tokens/s and ratios if every model FLOP ran at the measured bf16 matmul rate.
This is a benchmark, not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

import maskedlm.attention as attn
from maskedlm.config import Config, MaskingConfig, ModelConfig, OptimConfig, TrainConfig
from maskedlm.data.loader import MicroBatch, StepBatch
from maskedlm.masking import MaskedBatch, default_k_max, mask_batch
from maskedlm.model import MaskedLM
from maskedlm.process import reuse_host_memory
from maskedlm.tokenizer import SpecialIds
from maskedlm.train import Trainer

# Everything a system can be; the default list is chosen in main() from --dtype and what is installed.
MASKEDLM_SYSTEMS = ["maskedlm-bert-bf16", "maskedlm-modern-bf16", "maskedlm-bert-fp32", "maskedlm-modern-fp32"]
PEER_SYSTEMS = ["hf-bert-fp32", "hf-bert-bf16", "hf-modern-sparse-fp32", "hf-modern-sparse-bf16"]
PEAKS = ["peak-matmul-bf16", "peak-matmul-fp32"]

# Synthetic special ids for the random batches; the step's cost does not depend on which ids they are.
PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4


# ----------------------------------------------------------------------------------------------------------- shapes
def flops_per_token(family: str, layers: int, hidden: int, intermediate: int, vocab: int, seq_len: int,
                    mask_rate: float, dense_head: bool = False) -> float:
    """Matmul FLOPs of one train step per input token (forward + backward = 3 × forward's 2 FLOPs per MAC).

    6·N·tokens for the block weights (Kaplan et al. 2020), plus attention scores and values (12·L·T·d per token),
    plus the MLM head (transform d×d and tied decoder d×V) at the masked positions only, or at every position for a
    dense head. Embedding lookups and elementwise work are not counted, as in the usual MFU convention.
    """
    mlp = (3 if family == "modern" else 2) * hidden * intermediate  # GeGLU's Wi is d → 2·I
    block = 4 * hidden * hidden + mlp
    head = hidden * hidden + hidden * vocab
    head_share = 1.0 if dense_head else mask_rate
    return 6.0 * layers * block + 12.0 * layers * seq_len * hidden + 6.0 * head_share * head


def count_params(model: torch.nn.Module) -> dict:
    total = sum(p.numel() for p in model.parameters())  # shared (tied) tensors counted once
    emb = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    return {"total": total, "non_embedding": total - emb}


# ----------------------------------------------------------------------------------------------------------- data
def make_batches(n: int, batch: int, seq_len: int, vocab: int, mask_rate: float, seed: int = 0):
    """Random rows shaped like prepared data ([CLS] first, a [SEP] between documents), masked once, up front.

    Masking is maskedlm.masking's (so maskedlm sees exactly its own inputs). All systems get the same x̄ and the same
    selected positions: HF peers as labels (-100 elsewhere), maskedlm as (positions, targets).
    """
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(5, vocab, (batch, seq_len), generator=g)
        ids[:, 0] = CLS
        ids[:, seq_len // 2] = SEP  # one document boundary per row
        row_index = torch.arange(i * batch, (i + 1) * batch)
        mb = _mask(ids, row_index, vocab, mask_rate, g)
        labels = torch.full_like(ids, -100)
        b_idx = torch.arange(batch).unsqueeze(1).expand_as(mb["positions"])
        labels[b_idx[mb["valid"]], mb["positions"][mb["valid"]]] = mb["targets"][mb["valid"]]
        mb["labels"] = labels
        mb["attention_mask"] = torch.ones_like(ids)
        out.append(mb)
    return out


def _mask(ids, row_index, vocab, mask_rate, g):
    special = SpecialIds(pad=PAD, unk=UNK, cls=CLS, sep=SEP, mask=MASK)
    cfg = MaskingConfig(mask_rate=mask_rate)
    m = mask_batch(ids, row_index, 0, cfg, special, vocab, k_max=default_k_max(ids.shape[1], mask_rate))
    # count: |A(x)| as a host number, as the loader hands it to the step (reading a device tensor would sync).
    return {"input_ids": m.input_ids, "positions": m.positions, "valid": m.valid, "targets": m.targets,
            "num_selected": m.num_selected, "count": int(m.num_selected), "masking": "maskedlm.masking"}


def to_device(mb: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in mb.items()}


# ----------------------------------------------------------------------------------------------------------- systems
def _autocast(device: torch.device, bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _adamw(params, lr: float, device: torch.device):
    # Peers get what a user of torch gets by default; fused on CUDA is what HF Trainer picks ("adamw_torch_fused").
    kw = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.01, **kw)


class System:
    """One contender: build() makes the model and optimizer; step(batch) runs one full train step."""

    name = ""
    family = "bert"
    dense_head = False
    compile_s = 0.0

    def __init__(self, args, device):
        self.args, self.device = args, device
        self.bf16 = "-bf16" in self.name
        self.compiled = self.name.endswith("-compile")

    def params(self) -> dict:
        return count_params(self.model)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()


class HFSystem(System):
    def build(self):
        a = self.args
        torch.manual_seed(0)
        if self.family == "bert":
            from transformers import BertConfig, BertForMaskedLM

            cfg = BertConfig(vocab_size=a.vocab, hidden_size=a.hidden, num_hidden_layers=a.layers,
                             num_attention_heads=a.heads, intermediate_size=a.intermediate,
                             max_position_embeddings=max(512, a.seq_len), hidden_dropout_prob=0.0,
                             attention_probs_dropout_prob=0.0, pad_token_id=PAD)
            self.model = BertForMaskedLM._from_config(cfg, attn_implementation="sdpa")
        else:
            from transformers import ModernBertConfig, ModernBertForMaskedLM

            cfg = ModernBertConfig(vocab_size=a.vocab, hidden_size=a.hidden, num_hidden_layers=a.layers,
                                   num_attention_heads=a.heads, intermediate_size=a.intermediate,
                                   max_position_embeddings=max(512, a.seq_len), pad_token_id=PAD, bos_token_id=CLS,
                                   eos_token_id=SEP, cls_token_id=CLS, sep_token_id=SEP, sparse_prediction=True,
                                   global_attn_every_n_layers=1, layer_types=["full_attention"] * a.layers)
            self.model = ModernBertForMaskedLM._from_config(cfg, attn_implementation="sdpa")
        self.model.to(self.device).train()
        self.opt = _adamw(self.model.parameters(), 1e-4, self.device)
        if a.compile_peers or self.compiled:
            self.model = torch.compile(self.model)

    def step(self, mb):
        with _autocast(self.device, self.bf16):
            out = self.model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], labels=mb["labels"])
        out.loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return out.loss


class HFBert(HFSystem):
    family, dense_head = "bert", True  # BertForMaskedLM's head runs on every position


class HFModern(HFSystem):
    family = "modern"


class MaskedLMSystem(System):
    """maskedlm's shipped optimizer step, `Trainer.train_step`: the normaliser, clipping, the non-finite skip and the
    LR schedule included, exactly what `maskedlm train` runs per step."""

    def build(self):
        a = self.args
        self.family = "modern" if "-modern-" in self.name else "bert"
        mcfg = ModelConfig(family=self.family, vocab_size=a.vocab, hidden=a.hidden, layers=a.layers, heads=a.heads,
                           intermediate=a.intermediate, max_positions=max(512, a.seq_len))
        cfg = Config(model=mcfg, optim=OptimConfig(lr=1e-4),
                     train=TrainConfig(precision="bf16" if self.bf16 else "fp32", compile=bool(a.compile or self.compiled)))
        torch.manual_seed(0)
        self.model = MaskedLM(mcfg).train()
        self.trainer = Trainer(cfg, self.model, device=self.device)

    def step(self, mb):
        masked = MaskedBatch(input_ids=mb["input_ids"], positions=mb["positions"], valid=mb["valid"],
                             targets=mb["targets"], num_selected=torch.tensor(mb["count"]))
        batch = StepBatch(position=0, epoch=0, micro=[MicroBatch(ids=mb["input_ids"], flags=None, row_index=None,
                                                                 epoch=0, masked=masked)])
        if "-sdpa" not in self.name:
            return self.trainer.train_step(batch).sums[0]
        # the attention before the CPU explicit path: SDPA everywhere (same process A/B)
        saved = attn.CPU_EXPLICIT_ATTENTION_MAX_SCORES
        attn.CPU_EXPLICIT_ATTENTION_MAX_SCORES = -1
        try:
            return self.trainer.train_step(batch).sums[0]
        finally:
            attn.CPU_EXPLICIT_ATTENTION_MAX_SCORES = saved


def make_system(name, args, device) -> System:
    if name.startswith("maskedlm-"):
        cls = type("S", (MaskedLMSystem,), {"name": name})
    elif name.startswith("hf-bert"):
        cls = type("S", (HFBert,), {"name": name})
    elif name.startswith("hf-modern"):
        cls = type("S", (HFModern,), {"name": name})
    else:
        raise SystemExit(f"throughput.py: unknown system {name!r}; choose from {MASKEDLM_SYSTEMS + PEER_SYSTEMS}")
    return cls(args, device)


# ----------------------------------------------------------------------------------------------------------- peaks
class PeakMatmul:
    """A square matmul loop: the ceiling for this device in one dtype, timed in the same rounds as the systems."""

    def __init__(self, dtype, device, n):
        g = torch.Generator(device="cpu").manual_seed(0)
        self.a = torch.randn(n, n, generator=g).to(device, dtype)
        self.b = torch.randn(n, n, generator=g).to(device, dtype)
        self.flops = 2.0 * n**3
        self.device = device

    def run(self, reps: int) -> float:
        """Seconds per matmul."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = _clock()
        for _ in range(reps):
            c = self.a @ self.b
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        del c
        return (_clock() - t0) / reps


# ----------------------------------------------------------------------------------------------------------- memory
def tune_malloc() -> bool:
    """The allocator setting `maskedlm train` applies on CPU (train.reuse_host_memory), for every system alike."""
    return reuse_host_memory()


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_child(name: str, argv: list[str]) -> float | None:
    """Peak RSS (MiB) of a fresh process that builds one system and runs 3 steps: RSS is per process, so a system's
    own peak cannot be separated from the others' inside the benchmark process."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--systems", name, "--_memory-child"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        return json.loads(r.stdout.strip().splitlines()[-1])["peak_rss_mib"]
    except Exception:
        return None


# ----------------------------------------------------------------------------------------------------------- main
_clock = time.perf_counter  # --cpu-time swaps in time.process_time
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=30522)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--mask-rate", type=float, default=0.15)
    p.add_argument("--preset", choices=["default", "bert-base"], default="default",
                   help="bert-base: 12 layers, hidden 768, 12 heads, intermediate 3072 (overrides the shape flags)")
    p.add_argument("--dtype", choices=["bf16", "fp32", "both"], default="bf16",
                   help="maskedlm's precision in the default system list (peers always run both)")
    p.add_argument("--systems", nargs="+", default=None, metavar="NAME",
                   help=f"subset of {MASKEDLM_SYSTEMS + PEER_SYSTEMS} (default: all available at --dtype); "
                   "append -compile to a name to torch.compile that system alone (e.g. maskedlm-bert-bf16-compile), "
                   "-sdpa to a maskedlm name to turn off the CPU explicit attention for it (e.g. maskedlm-bert-bf16-sdpa)")
    p.add_argument("--rounds", type=int, default=5, help="measured rounds; each runs every system once")
    p.add_argument("--steps", type=int, default=2, help="train steps per system per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per system before the rounds")
    p.add_argument("--compile", action="store_true", help="torch.compile maskedlm's model (compile time reported apart)")
    p.add_argument("--compile-peers", action="store_true", help="also torch.compile the transformers models")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--cpu-time", action="store_true",
                   help="time by process CPU time instead of wall time: steadier A/B numbers on a shared machine "
                   "(use with --threads 1; tokens/s then means tokens per CPU-second)")
    p.add_argument("--malloc", choices=["default", "tuned", "as-shipped"], default="tuned",
                   help="tuned (default, as maskedlm train does on CPU): glibc mallopt so step buffers are reused instead "
                   "of re-mmapped, for all systems alike; default: glibc's defaults for all; as-shipped: each system as "
                   "its users get it (maskedlm tuned, as `maskedlm train` sets it; transformers with glibc's defaults), "
                   "which needs a fresh child process per system and round (the setting is per process)")
    p.add_argument("--peak-n", type=int, default=0, help="matmul size for the peaks (0: 2048 on CPU, 8192 on CUDA)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-system peak RSS child processes (CPU)")
    p.add_argument("--gpu-peak-tflops", type=float, default=0.0,
                   help="the card's bf16 dense peak (e.g. 989 for H100/H200 SXM): also print MFU against it")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    p.add_argument("--profile", default=None, metavar="SYSTEM",
                   help="instead of the rounds: torch.profiler over a few steps of SYSTEM, print the top ops")
    p.add_argument("--profile-rows", type=int, default=30)
    p.add_argument("--_memory-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_timing-child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.preset == "bert-base":
        a.layers, a.hidden, a.heads, a.intermediate = 12, 768, 12, 3072
    return a


def shape_argv(a) -> list[str]:
    return ["--layers", str(a.layers), "--hidden", str(a.hidden), "--heads", str(a.heads), "--intermediate",
            str(a.intermediate), "--vocab", str(a.vocab), "--seq-len", str(a.seq_len), "--batch", str(a.batch),
            "--mask-rate", str(a.mask_rate), "--device", a.device, "--threads", str(a.threads), "--malloc", a.malloc] + (
        ["--compile"] if a.compile else []) + (["--compile-peers"] if a.compile_peers else [])


def memory_child(a, device):
    """Child-process mode: one system, a few steps, print its peak RSS."""
    sys_ = make_system(a.systems[0], a, device)
    sys_.build()
    for mb in make_batches(3, a.batch, a.seq_len, a.vocab, a.mask_rate):
        sys_.step(to_device(mb, device))
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork+exec, so a child would report its parent's RSS.
    print(json.dumps({"peak_rss_mib": _status_mib("VmHWM")}))


def timing_child(a, device):
    """Child-process mode for --malloc as-shipped: one system, warm-up, then --steps timed steps; prints JSON."""
    s = make_system(a.systems[0], a, device)
    s.build()
    batches = [to_device(mb, device) for mb in make_batches(4, a.batch, a.seq_len, a.vocab, a.mask_rate)]
    t0 = _clock()
    s.step(batches[0])
    first = _clock() - t0
    for i in range(1, max(a.warmup, 1)):
        s.step(batches[i % len(batches)])
    times = []
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    for i in range(a.steps):
        t0 = _clock()
        s.step(batches[(a.warmup + i) % len(batches)])
        times.append(_clock() - t0)
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"times": times, "compile_s": max(0.0, first - min(times)),
                      "sys_s": (ru1.ru_stime - ru0.ru_stime) / a.steps, "faults": (ru1.ru_minflt - ru0.ru_minflt) / a.steps}))


def shipped_malloc(name: str) -> str:
    """The allocator a system's users get: maskedlm train tunes glibc on CPU; transformers leaves it alone."""
    return "tuned" if name.startswith("maskedlm-") else "default"


def child_argv(a, name: str) -> list[str]:
    """shape_argv for a child process running `name`; under --malloc as-shipped, with that system's allocator."""
    argv = shape_argv(a)
    if a.malloc == "as-shipped":
        argv[argv.index("--malloc") + 1] = shipped_malloc(name)
    return argv


def timing_in_child(name: str, a) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *child_argv(a, name), "--systems", name, "--_timing-child",
           "--warmup", str(a.warmup), "--steps", str(a.steps)] + (["--cpu-time"] if a.cpu_time else [])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise SystemExit(f"throughput.py: the {name} child failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def profile(a, device):
    """Where a step's time goes: torch.profiler over `--steps` steps after the warm-up, ops sorted by self time."""
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as tprofile

    s = make_system(a.profile, a, device)
    s.build()
    batches = [to_device(mb, device) for mb in make_batches(4, a.batch, a.seq_len, a.vocab, a.mask_rate)]
    for i in range(max(a.warmup, 1)):
        s.step(batches[i % 4])
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    t0 = time.perf_counter()
    with tprofile(activities=acts, record_shapes=True) as prof:
        for i in range(a.steps):
            with record_function("train_step"):
                s.step(batches[i % 4])
            s.sync()
    wall = (time.perf_counter() - t0) / a.steps
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=a.profile_rows))
    print(prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=a.profile_rows))
    print(f"{a.profile}: {wall * 1e3:.1f} ms/step under the profiler, {a.batch * a.seq_len / wall:,.0f} tokens/s")


def main(argv=None):
    a = parse_args(argv)
    if a.cpu_time:
        global _clock
        _clock = time.process_time
    device = torch.device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.malloc == "tuned" and not tune_malloc():
        print("note: --malloc tuned needs glibc; running with the default allocator")
    if a._memory_child:
        return memory_child(a, device)
    if a._timing_child:
        return timing_child(a, device)
    as_shipped = a.malloc == "as-shipped"
    if as_shipped and device.type != "cpu":
        raise SystemExit("throughput.py: --malloc as-shipped is about the CPU host allocator; use it with --device cpu")
    if a.profile:
        return profile(a, device)

    if a.systems is None:
        ours = [s for s in MASKEDLM_SYSTEMS if a.dtype == "both" or s.endswith(a.dtype)]
        a.systems = ours + PEER_SYSTEMS

    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f", {torch.get_num_threads()} threads")
          + f"; shape: layers {a.layers}, hidden {a.hidden}, heads {a.heads}, intermediate {a.intermediate}, "
          f"vocab {a.vocab}, seq_len {a.seq_len}, batch {a.batch}, mask rate {a.mask_rate}; malloc {a.malloc}"
          + ("; timing by process CPU time" if a.cpu_time else ""))

    batches = [to_device(mb, device) for mb in make_batches(4, a.batch, a.seq_len, a.vocab, a.mask_rate)]
    tokens_per_step = a.batch * a.seq_len
    sel = float(sum(int(mb["num_selected"]) for mb in batches)) / (len(batches) * tokens_per_step)
    print(f"masking: {batches[0]['masking']}, selected share {sel:.4f}, K_max {batches[0]['positions'].shape[1]}")

    systems = []
    for name in a.systems:
        s = make_system(name, a, device)
        s.build()  # as-shipped: built here for the parameter counts only; warmed up and timed in child processes
        systems.append(s)
    print("\nparameters (embedding = all nn.Embedding tables; decoder tied):")
    for s in systems:
        p = s.params()
        print(f"  {s.name:24s} total {p['total']:>11,}  non-embedding {p['non_embedding']:>11,}")

    # Warm-up: first steps allocate, pick kernels and (with --compile) trace and compile; timed apart.
    print("\nwarm-up ...", flush=True)
    for s in [] if as_shipped else systems:
        s.sync()
        t0 = _clock()
        s.step(batches[0])
        s.sync()
        first = _clock() - t0
        for i in range(1, max(a.warmup, 1)):
            s.step(batches[i % len(batches)])
        s.sync()
        t0 = _clock()
        s.step(batches[1 % len(batches)])
        s.sync()
        s.compile_s = max(0.0, first - (_clock() - t0))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
    n_peak = a.peak_n or (8192 if device.type == "cuda" else 2048)
    peaks = {"peak-matmul-bf16": PeakMatmul(torch.bfloat16, device, n_peak),
             "peak-matmul-fp32": PeakMatmul(torch.float32, device, n_peak)}
    for pk in peaks.values():
        pk.run(2)
    peak_reps = 20 if device.type == "cuda" else 4

    times: dict[str, list[float]] = {s.name: [] for s in systems}
    peak_times: dict[str, list[float]] = {k: [] for k in peaks}
    gpu_mem: dict[str, float] = {s.name: 0.0 for s in systems}
    sys_s: dict[str, list[float]] = {s.name: [] for s in systems}  # kernel time: page faults show up here
    faults: dict[str, list[float]] = {s.name: [] for s in systems}
    print(f"{a.rounds} rounds × {a.steps} steps per system, interleaved ...", flush=True)
    for r in range(a.rounds):
        order = systems if r % 2 == 0 else systems[::-1]  # alternate the order so no system always follows another
        for s in order:
            if as_shipped:
                res = timing_in_child(s.name, a)
                times[s.name].append(statistics.median(res["times"]))
                sys_s[s.name].append(res["sys_s"])
                faults[s.name].append(res["faults"])
                s.compile_s = max(s.compile_s, res["compile_s"])
                continue
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            s.sync()
            ru0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = _clock()
            for i in range(a.steps):
                s.step(batches[(r * a.steps + i) % len(batches)])
            s.sync()
            times[s.name].append((_clock() - t0) / a.steps)
            ru1 = resource.getrusage(resource.RUSAGE_SELF)
            sys_s[s.name].append((ru1.ru_stime - ru0.ru_stime) / a.steps)
            faults[s.name].append((ru1.ru_minflt - ru0.ru_minflt) / a.steps)
            if device.type == "cuda":
                gpu_mem[s.name] = max(gpu_mem[s.name], torch.cuda.max_memory_allocated(device) / 2**20)
        for k, pk in peaks.items():
            peak_times[k].append(pk.run(peak_reps))
        line = "  ".join(f"{s.name}={tokens_per_step / times[s.name][-1]:,.0f}" for s in systems)
        print(f"  round {r + 1}: {line}", flush=True)

    peak_gflops = {k: pk.flops / statistics.median(peak_times[k]) / 1e9 for k, pk in peaks.items()}
    mem = {}
    if device.type == "cuda":
        mem = gpu_mem
    elif not a.no_memory:
        print("peak RSS per system (fresh child process each) ...", flush=True)
        for s in systems:
            mem[s.name] = peak_rss_child(s.name, child_argv(a, s.name))

    results = []
    for s in systems:
        tps = tokens_per_step / statistics.median(times[s.name])
        fpt = flops_per_token(s.family, a.layers, a.hidden, a.intermediate, a.vocab, a.seq_len, a.mask_rate)
        exec_fpt = flops_per_token(s.family, a.layers, a.hidden, a.intermediate, a.vocab, a.seq_len, a.mask_rate,
                                   dense_head=s.dense_head)
        gf = tps * fpt / 1e9
        results.append({"system": s.name, "tokens_per_s": tps, "step_ms": 1e3 * statistics.median(times[s.name]),
                        "best_tokens_per_s": tokens_per_step / min(times[s.name]),
                        "spread_pct": 100 * (max(times[s.name]) - min(times[s.name])) / statistics.median(times[s.name]),
                        "model_mflop_per_token": fpt / 1e6, "executed_mflop_per_token": exec_fpt / 1e6,
                        "gflops": gf, "frac_bf16_peak": gf / peak_gflops["peak-matmul-bf16"],
                        "frac_fp32_peak": gf / peak_gflops["peak-matmul-fp32"], "compile_s": s.compile_s,
                        "peak_mem_mib": mem.get(s.name), "params": s.params(),
                        "sys_ms_per_step": 1e3 * statistics.median(sys_s[s.name]),
                        "minor_faults_per_step": statistics.median(faults[s.name])})

    print(f"\nmatmul peaks ({n_peak}×{n_peak}, median of rounds): bf16 {peak_gflops['peak-matmul-bf16']:,.0f} GFLOP/s, "
          f"fp32 {peak_gflops['peak-matmul-fp32']:,.0f} GFLOP/s")
    mem_label = "GPU MiB" if device.type == "cuda" else "RSS MiB"
    print(f"\n{'system':24s} {'tokens/s':>10s} {'best':>7s} {'ms/step':>8s} {'spread':>7s} {'MFLOP/tok':>9s} {'GFLOP/s':>8s} "
          f"{'%bf16pk':>7s} {'%fp32pk':>7s} {mem_label:>8s} {'compile s':>9s} {'sys ms':>6s} {'faults':>7s}")
    for r_ in results:
        m = r_["peak_mem_mib"]
        print(f"{r_['system']:24s} {r_['tokens_per_s']:>10,.0f} {r_['best_tokens_per_s']:>7,.0f} {r_['step_ms']:>8.1f} {r_['spread_pct']:>6.0f}% "
              f"{r_['model_mflop_per_token']:>9.1f} {r_['gflops']:>8.1f} {100 * r_['frac_bf16_peak']:>6.1f}% "
              f"{100 * r_['frac_fp32_peak']:>6.1f}% {('%8.0f' % m) if m else '     n/a'} {r_['compile_s']:>9.1f} "
              f"{r_['sys_ms_per_step']:>6.0f} {r_['minor_faults_per_step']:>7.0f}")
    if a.gpu_peak_tflops:
        for r_ in results:
            print(f"MFU {r_['system']}: {100 * r_['gflops'] / (a.gpu_peak_tflops * 1e3):.1f}% of {a.gpu_peak_tflops:g} "
                  "TFLOP/s bf16 dense peak")
    print("(MFLOP/tok: model FLOPs with the head at the masked positions only; dense-head systems execute more:"
          + "".join(f" {r_['system']} {r_['executed_mflop_per_token']:.1f}" for r_ in results
                    if r_["executed_mflop_per_token"] != r_["model_mflop_per_token"]) + ")")

    print("(tokens/s: median over rounds; best: the fastest round, closest to an idle machine when others share it)")
    print("\nratios (row ÷ column, median tokens/s):")
    names = [r_["system"] for r_ in results]
    w = max(len(n) for n in names)
    print(" " * (w + 1) + " ".join(f"{n[:14]:>14s}" for n in names))
    for r1 in results:
        print(f"{r1['system']:{w}s} " + " ".join(f"{r1['tokens_per_s'] / r2['tokens_per_s']:>14.2f}" for r2 in results))
    # Roofline: a step whose every FLOP ran at the measured matmul rate; what torch's matmuls allow a ratio to reach.
    peers = [r_ for r_ in results if not r_["system"].startswith("maskedlm-")]
    ours = [r_ for r_ in results if r_["system"].startswith("maskedlm-")]
    if ours and peers:
        print("\nceiling (every model FLOP at the bf16 matmul rate measured above, nothing else in the step):")
    for r_ in ours:
        r_["at_peak_tokens_per_s"] = r_["tokens_per_s"] / r_["frac_bf16_peak"]  # = the bf16 rate ÷ FLOPs per token
        if peers:
            print(f"{r_['system']:{w}s} {r_['at_peak_tokens_per_s']:,.0f} tokens/s at the peak: "
                  + ", ".join(f"{r_['at_peak_tokens_per_s'] / p_['tokens_per_s']:.2f}× {p_['system']}" for p_ in peers)
                  + f" (measured: {100 * r_['frac_bf16_peak']:.0f}% of it)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "peaks_gflops": peak_gflops, "results": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main()

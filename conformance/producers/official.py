"""Expected outputs from the official DeepSeek-V3 inference code, run from a checkout the user gives.

    python -m dsv3_conformance.producers.official --official CHECKOUT --weights CASE --out DIR [--dtype bfloat16]
        [--gemm-impl bf16|fp8] [--device cpu|cuda] [--seeds 1,2,3] [--prompt-len 24] [--decode-steps 6]

`CASE` is a golden case folder (config.json with the official ModelArgs in meta.json's `model_args`, and
model.safetensors in Hugging Face names); its weights are loaded into the official `Transformer`. For each
seed a random prompt is run: every block's output and the last logits of the prompt, the last logits in
the naive attention form, then a greedy continuation one token at a time with the logits of each step.
DIR receives `expected-s<seed>.safetensors` per seed and `meta.json`; with `--case`, DIR becomes a whole
golden case (config, weights, the first seed as expected.safetensors).

Needs torch and safetensors only. The official code is imported from the checkout, never copied; three
changes are made from outside it, none in its math: the gate gets its correction bias at every width (the
code creates one only when dim == 7168), the compute dtype is chosen (`--dtype`: bfloat16 is the official
default), and on a CPU its three Triton kernels (kernel.py) are replaced by exact emulations written here.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dsv3_conformance.format.checkpoint import hf_to_official
from dsv3_conformance.format.errors import BadInput

BLOCK = 128


# --- CPU stand-ins for inference/kernel.py (exact emulations of its three kernels) --------------------------

def act_quant(x: torch.Tensor, block_size: int = BLOCK, scale_fmt: str | None = None):
    groups = x.float().reshape(*x.shape[:-1], x.shape[-1] // block_size, block_size)
    scales = groups.abs().amax(dim=-1).clamp(min=1e-4) / 448.0
    if scale_fmt == "ue8m0":
        scales = torch.exp2(torch.ceil(torch.log2(scales)))  # float32 log2, as the kernel computes it
    quantized = (groups / scales[..., None]).to(torch.float8_e4m3fn)
    return quantized.reshape(x.shape), scales


def weight_dequant(weight: torch.Tensor, scale: torch.Tensor, block_size: int = BLOCK) -> torch.Tensor:
    expanded = scale.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)
    return (weight.float() * expanded[: weight.shape[0], : weight.shape[1]]).to(torch.get_default_dtype())


def fp8_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor) -> torch.Tensor:
    k = a.shape[-1]
    rows, row_scales = a.reshape(-1, k).float(), a_s.reshape(-1, k // BLOCK)
    column_scales = b_s.repeat_interleave(BLOCK, 0)[: b.shape[0]]
    out = torch.zeros(rows.shape[0], b.shape[0])
    for kb in range(k // BLOCK):
        part = slice(kb * BLOCK, (kb + 1) * BLOCK)
        out += (rows[:, part] @ b[:, part].float().T) * row_scales[:, kb, None] * column_scales[None, :, kb]
    return out.reshape(*a.shape[:-1], b.shape[0]).to(torch.get_default_dtype())


def load_official(checkout: Path, device: str) -> types.ModuleType:
    inference = checkout / "inference"
    if not (inference / "model.py").is_file():
        raise BadInput(f"{checkout}: not a DeepSeek-V3 checkout (expected {inference / 'model.py'}, found no such file)")
    if device == "cpu":
        sys.modules["kernel"] = types.SimpleNamespace(act_quant=act_quant, weight_dequant=weight_dequant,
                                                      fp8_gemm=fp8_gemm)
    else:
        sys.path.insert(0, str(inference))
    spec = importlib.util.spec_from_file_location("official_model", inference / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _commit(checkout: Path) -> str:
    done = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "unknown (not a git checkout)"


def build(official, model_args: dict, weights: dict[str, torch.Tensor], attn_impl: str, gemm_impl: str):
    official.attn_impl, official.gemm_impl = attn_impl, gemm_impl
    args = official.ModelArgs(**model_args)
    model = official.Transformer(args)
    if args.dtype != "fp8" and torch.get_default_dtype() == torch.float32:
        model = model.float()  # its Linear class is bfloat16 unless fp8: float32 runs make it float32 too
    for module in model.modules():
        if isinstance(module, official.Gate) and module.bias is None and any(k.endswith("gate.bias") for k in weights):
            module.bias = torch.nn.Parameter(torch.empty(args.n_routed_experts, dtype=torch.float32))
    state = {}
    for name, tensor in weights.items():
        target = model.state_dict()[name]
        state[name] = tensor if tensor.dtype == torch.float8_e4m3fn else tensor.to(target.dtype)
    model.load_state_dict(state, strict=True)
    return model.eval()


def run(model, tokens: torch.Tensor, steps: int) -> dict[str, torch.Tensor]:
    hidden = {}
    hooks = [layer.register_forward_hook(lambda m, i, o, index=index: hidden.__setitem__(index, o.float().clone()))
             for index, layer in enumerate(model.layers)]
    logits = model(tokens, 0).float()
    for hook in hooks:
        hook.remove()
    out = {f"prefill.layer.{i}.hidden": hidden[i] for i in sorted(hidden)}
    out["prefill.logits_last"] = logits
    decoded, position = [], tokens.shape[1]
    for step in range(steps):
        decoded.append(logits.argmax(-1))
        logits = model(decoded[-1][:, None], position).float()
        out[f"decode.{step}.logits"] = logits
        position += 1
    out["tokens.prompt"], out["tokens.decoded"] = tokens, torch.stack(decoded, 1)
    return out


class OfficialRunner:
    """The official `Transformer` over a checkpoint folder (Hugging Face names; MTP tensors left out, as the
    official code has no MTP module), behind the Runner interface a golden case maker reads: `prefill` gives
    the last position's logits (all the official forward returns) and every block's output, `decode` one token
    per sequence after the cached ones. Absorbed attention, the dequantized (bf16) path."""

    def __init__(self, checkout: Path, folder: Path, config, device: str = "cpu", dtype: str = "float32"):
        from dsv3_conformance.format.config import to_official_dict

        self.config = config
        self.official = load_official(checkout, device)
        self.commit = _commit(checkout)
        self.device = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        torch.set_default_dtype(getattr(torch, dtype))
        torch.set_default_device(device)
        model_args = dict(to_official_dict(config), max_batch_size=4)
        mtp = tuple(f"model.layers.{config.n_layers + depth}." for depth in range(config.n_mtp_layers))
        weights = {hf_to_official(name): tensor.to(device) for shard in sorted(Path(folder).glob("*.safetensors"))
                   for name, tensor in load_file(str(shard)).items() if not name.startswith(mtp)}
        self.model = build(self.official, model_args, weights, "absorb", "bf16")
        self.position = 0

    def _hidden(self, run):
        hidden = {}
        hooks = [layer.register_forward_hook(lambda m, i, o, index=index: hidden.__setitem__(index, o))
                 for index, layer in enumerate(self.model.layers)]
        try:
            with torch.no_grad():
                logits = run()
        finally:
            for hook in hooks:
                hook.remove()
        return logits, tuple(hidden[i].float().cpu().numpy() for i in sorted(hidden))

    def prefill(self, tokens, forced_experts=None, capacity=None):
        from dsv3_conformance.backends import StepOutput

        self.official.attn_impl = "absorb"
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        logits, hidden = self._hidden(lambda: self.model(tokens, 0))
        self.position = tokens.shape[1]
        return StepOutput(logits.float().cpu().numpy()[:, None, :], hidden, ())

    def decode(self, tokens, forced_experts=None):
        from dsv3_conformance.backends import StepOutput

        tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1, 1)
        logits, hidden = self._hidden(lambda: self.model(tokens, self.position))
        self.position += 1
        return StepOutput(logits.float().cpu().numpy()[:, None, :], hidden, ())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True, type=Path, help="a DeepSeek-V3 checkout")
    parser.add_argument("--weights", required=True, type=Path, help="a golden case folder (meta.json model_args)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--gemm-impl", default="bf16", choices=("bf16", "fp8"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--seeds", default="1", help="comma-separated prompt seeds")
    parser.add_argument("--prompt-len", type=int, default=24)
    parser.add_argument("--decode-steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=1, help="runs per seed (run-to-run spread on a GPU)")
    parser.add_argument("--case", default=None, help="make DIR a whole golden case of this name")
    parser.add_argument("--commit", default=None, help="the checkout's commit, when it is not a git checkout")
    args = parser.parse_args()
    official = load_official(args.official, args.device)
    source = json.loads((args.weights / "meta.json").read_text())
    model_args = dict(source["model_args"], max_batch_size=4)
    torch.set_default_dtype(getattr(torch, args.dtype))
    torch.set_default_device(args.device)
    weights = {hf_to_official(name): tensor.to(args.device)
               for name, tensor in load_file(str(args.weights / "model.safetensors")).items()}
    forms = {form: build(official, model_args, weights, form, args.gemm_impl) for form in ("absorb", "naive")}
    # MLA reads the module-level attn_impl at every call: set it to the form of the model about to run.
    args.out.mkdir(parents=True, exist_ok=True)
    spread = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        generator = torch.Generator("cpu").manual_seed(seed)
        tokens = torch.randint(0, model_args["vocab_size"], (2, args.prompt_len), generator=generator,
                               device="cpu").to(args.device)
        official.attn_impl = "absorb"
        outputs = [run(forms["absorb"], tokens, args.decode_steps) for _ in range(args.repeats)]
        expected = dict(outputs[0])
        official.attn_impl = "naive"
        expected["prefill.logits_last.naive"] = forms["naive"](tokens, 0).float()
        spread[seed] = max(float((a - b).abs().max()) for other in outputs[1:] for a, b in
                           zip(outputs[0].values(), other.values()) if a.is_floating_point()) if args.repeats > 1 else None
        save_file({k: v.contiguous().cpu() for k, v in expected.items()}, str(args.out / f"expected-s{seed}.safetensors"))
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    meta = {"case": args.case or args.out.name, "producer": "conformance/producers/official.py",
            "official_commit": args.commit or _commit(args.official), "torch": torch.__version__, "device": device_name,
            "compute_dtype": args.dtype, "gemm_impl": args.gemm_impl, "ue8m0_scope": "official",
            "attn_impl": "absorb (naive given as prefill.logits_last.naive)", "seeds": args.seeds,
            "prompt_len": args.prompt_len, "decode_steps": args.decode_steps, "model_args": model_args,
            "weights_from": str(args.weights), "run_to_run_max_abs": spread,
            "changes_to_the_official_code": ["gate correction bias at every width", f"compute dtype {args.dtype}"]
            + (["CPU stand-ins for kernel.py (act_quant, weight_dequant, fp8_gemm)"] if args.device == "cpu" else [])}
    if args.case:
        first = args.out / f"expected-s{args.seeds.split(',')[0]}.safetensors"
        first.rename(args.out / "expected.safetensors")
        for name in ("config.json", "model.safetensors"):
            shutil.copyfile(args.weights / name, args.out / name)
    (args.out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps({k: v for k, v in meta.items() if k != "model_args"}, indent=2))


if __name__ == "__main__":
    main()

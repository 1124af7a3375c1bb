"""Writes local, offline model folders for the axolotl examples (no network; HF_HUB_OFFLINE=1 is fine):

  OUT/ring_mini_arch   Bailing-MoE-V2 (Ring/Ling 2.0 architecture, `bailing_moe_v2`, remote code): our
                       test fixture's configuration_/modeling_bailing_moe_v2.py (tests/fixtures/ring_remote)
                       with config.json `auto_map`, Ring-mini-2.0 sizes but --layers layers (default 6)
  OUT/qwen3_moe_tiny   a small transformers-native Qwen3-MoE (`qwen3_moe`)
  OUT/qwen3_30b_arch   Qwen3-30B-A3B sizes (hidden 2048, 128 experts of 768, top-8, 32 heads of 128 with 4
                       KV heads) with --qwen30-layers layers (default 6; the real model has 48), the shape
                       of bench_moe.py's qwen3-30b-a3b rows
  OUT/tokenizer        a byte-level BPE tokenizer trained on examples/data/train.jsonl (also copied into
                       both model folders)

Weights are random (seeded), created directly on the GPU when there is one, in bf16, and saved with
save_pretrained (safetensors). --tiny shrinks every size so that CPU smoke tests take seconds.

    python3 examples/axolotl/make_models.py --out /tmp/moe_models [--layers 6] [--only ring|qwen] [--tiny]

Ring-mini-2.0 values used (from its public config.json): hidden 2048, 16 attention heads (head_dim 128),
moe_intermediate_size 512, 256 routed experts, top-8, n_group 8, topk_group 4, 1 shared expert,
routed_scaling_factor 2.5, sigmoid scores with expert bias, norm_topk_prob, vocab 157184, rms_norm_eps
1e-6, 20 layers in the real model. What the fixture does NOT model (so it is not written to config.json):
grouped-query attention (4 KV heads), rotary embeddings with partial_rotary_factor 0.5, QK-norm, and
first_k_dense_replace=1 (the real model's first layer is a dense MLP of intermediate_size 5120; here
every layer is a MoE layer). The fixture uses learnt absolute positions (max_position_embeddings).
"""

import argparse
import importlib.util
import json
import os
import shutil
import sys
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
RING_FIXTURE = os.path.join(REPO, "tests", "fixtures", "ring_remote")
DATA = os.path.join(REPO, "examples", "data", "train.jsonl")
RING_FILES = ("configuration_bailing_moe_v2.py", "modeling_bailing_moe_v2.py")

EOS, PAD = "<|endoftext|>", "<|pad|>"


def ring_config(layers, tiny):
    if tiny:
        return dict(vocab_size=8192, hidden_size=64, moe_intermediate_size=32,
                    num_experts=16, num_experts_per_tok=4, num_shared_experts=1, n_group=4, topk_group=2,
                    routed_scaling_factor=2.5, norm_topk_prob=True, score_function="sigmoid",
                    moe_router_enable_expert_bias=True, hidden_act="silu", num_hidden_layers=layers,
                    num_attention_heads=4, max_position_embeddings=4096, rms_norm_eps=1e-6,
                    initializer_range=0.02, use_cache=False)
    return dict(vocab_size=157184, hidden_size=2048, moe_intermediate_size=512, num_experts=256,
                num_experts_per_tok=8, num_shared_experts=1, n_group=8, topk_group=4,
                routed_scaling_factor=2.5, norm_topk_prob=True, score_function="sigmoid",
                moe_router_enable_expert_bias=True, hidden_act="silu", num_hidden_layers=layers,
                num_attention_heads=16, max_position_embeddings=4096, rms_norm_eps=1e-6,
                initializer_range=0.02, use_cache=False)


def qwen_config(layers, tiny, vocab, size="tiny"):
    if size == "30b" and not tiny:
        return dict(vocab_size=vocab, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                    num_experts=128, num_experts_per_tok=8, num_hidden_layers=layers, num_attention_heads=32,
                    num_key_value_heads=4, head_dim=128, max_position_embeddings=4096)
    if tiny:
        return dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                    num_experts=16, num_experts_per_tok=4, num_hidden_layers=layers, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, max_position_embeddings=4096)
    return dict(vocab_size=vocab, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
                num_experts=64, num_experts_per_tok=8, num_hidden_layers=layers, num_attention_heads=16,
                num_key_value_heads=4, head_dim=64, max_position_embeddings=4096)


def train_tokenizer(out_dir, vocab_size):
    """Byte-level BPE trained on our own dataset; saved as a PreTrainedTokenizerFast with eos/pad set."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def texts():
        with open(DATA) as f:
            for line in f:
                yield json.loads(line)["text"]

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, bos_token=None,
                                   unk_token=None, model_max_length=4096)
    fast.save_pretrained(out_dir)
    return fast


def load_ring_fixture(model_dir):
    """Import the two remote-code files the way transformers does (a package whose modules import each
    other relatively) and return (config module, modeling module)."""
    pkg = types.ModuleType("ring_make_models_pkg")
    pkg.__path__ = [model_dir]
    sys.modules[pkg.__name__] = pkg
    mods = {}
    for f in RING_FILES:
        name = f[:-3]
        spec = importlib.util.spec_from_file_location(pkg.__name__ + "." + name, os.path.join(model_dir, f))
        mods[name] = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mods[name]
        spec.loader.exec_module(mods[name])
    return mods["configuration_bailing_moe_v2"], mods["modeling_bailing_moe_v2"]


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def make_ring(out_dir, layers, tiny, tok, device, torch):
    os.makedirs(out_dir, exist_ok=True)
    for f in RING_FILES:
        shutil.copy(os.path.join(RING_FIXTURE, f), os.path.join(out_dir, f))
    cfgmod, modmod = load_ring_fixture(out_dir)
    values = ring_config(layers, tiny)
    assert len(tok) <= values["vocab_size"], "tokenizer ids must stay below vocab_size"
    cfg = cfgmod.BailingMoeV2Config(**values, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                    tie_word_embeddings=False)
    cfg.auto_map = {"AutoConfig": "configuration_bailing_moe_v2.BailingMoeV2Config",
                    "AutoModelForCausalLM": "modeling_bailing_moe_v2.BailingMoeV2ForCausalLM"}
    torch.manual_seed(1234)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 on the device: no fp32 copy of ~6B params
    try:
        with torch.device(device):
            model = modmod.BailingMoeV2ForCausalLM(cfg)
            with torch.no_grad():  # a visible selection bias, so that the bias path matters
                for layer in model.model.layers:
                    layer.mlp.gate.expert_bias.copy_(torch.randn(cfg.num_experts) * 0.05)
    finally:
        torch.set_default_dtype(prev)
    model.to(torch.bfloat16)
    return save(model, cfg, out_dir, tok)


def make_qwen(out_dir, layers, tiny, tok, device, torch, size="tiny"):
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig
    vocab = -(-len(tok) // 64) * 64
    cfg = Qwen3MoeConfig(**qwen_config(layers, tiny, vocab, size), norm_topk_prob=True, output_router_logits=False,
                         router_aux_loss_coef=0.0, decoder_sparse_step=1, mlp_only_layers=[],
                         tie_word_embeddings=False, use_cache=False, rms_norm_eps=1e-6,
                         bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(1234)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    return save(model, cfg, out_dir, tok)


def save(model, cfg, out_dir, tok):
    t0 = time.time()
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    cj_path = os.path.join(out_dir, "config.json")
    with open(cj_path) as f:
        cj = json.load(f)
    if getattr(cfg, "auto_map", None):  # save_pretrained writes only the auto_map entries it knows
        cj["auto_map"] = cfg.auto_map
    cj["torch_dtype"] = cj["dtype"] = "bfloat16"
    with open(cj_path, "w") as f:
        json.dump(cj, f, indent=2)
    return n_params(model), time.time() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder that receives ring_mini_arch/, qwen3_moe_tiny/, tokenizer/")
    ap.add_argument("--layers", type=int, default=6, help="Ring layers (default 6; the real Ring-mini-2.0 has 20)")
    ap.add_argument("--qwen-layers", type=int, default=8)
    ap.add_argument("--qwen30-layers", type=int, default=6)
    ap.add_argument("--only", choices=("ring", "qwen", "qwen30"), default=None,
                    help="make one model (default: ring and qwen; qwen30 only when asked for)")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes for CPU smoke tests")
    ap.add_argument("--vocab", type=int, default=8192, help="BPE vocabulary size of the tokenizer")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    args = ap.parse_args()

    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tok_dir = os.path.join(args.out, "tokenizer")
    t0 = time.time()
    tok = train_tokenizer(tok_dir, args.vocab)
    print(f"tokenizer: {len(tok)} tokens, eos={tok.eos_token_id} pad={tok.pad_token_id} -> {tok_dir} "
          f"({time.time() - t0:.1f}s)", flush=True)
    def make_qwen30(out_dir, layers, tiny, tok, device, torch):
        return make_qwen(out_dir, layers, tiny, tok, device, torch, size="30b")

    jobs = [("ring", "ring_mini_arch", make_ring, args.layers), ("qwen", "qwen3_moe_tiny", make_qwen, args.qwen_layers),
            ("qwen30", "qwen3_30b_arch", make_qwen30, args.qwen30_layers)]
    wanted = (args.only,) if args.only else ("ring", "qwen")
    for key, name, fn, layers in jobs:
        if key not in wanted:
            continue
        t0 = time.time()
        n, t_save = fn(os.path.join(args.out, name), layers, args.tiny, tok, device, torch)
        print(f"{name}: {n / 1e9:.3f}B params, {layers} layers, built on {device}, saved in {t_save:.1f}s "
              f"(total {time.time() - t0:.1f}s) -> {os.path.join(args.out, name)}", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

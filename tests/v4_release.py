"""DeepSeek-V4 checkpoints that transformers builds (several attention schedules, with or without the release's
MTP module) and the references the V4 tests compare against. Imported only by tests that have skipped
without transformers and torch."""

import json

import numpy as np
import torch
import transformers

SLIDE, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
SHAPES = dict(vocab_size=97, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
              head_dim=32, q_lora_rank=48, num_experts_per_tok=2, n_routed_experts=8, n_shared_experts=1,
              hc_mult=2, hc_sinkhorn_iters=5, sliding_window=8, o_groups=2, o_lora_rank=16, index_n_heads=16,
              index_head_dim=16, index_topk=3, partial_rotary_factor=0.25, max_position_embeddings=512,
              num_nextn_predict_layers=0)
# 16 indexer heads: no two entries tie at a score of exactly 0 on the top-k boundary
SCHEDULES = {
    "flash_like": dict(layer_types=[SLIDE, CSA, HCA, CSA], mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"],
                       compress_rates={CSA: 4, HCA: 8}),
    "pro_default": dict(compress_rates={CSA: 4, HCA: 16}, mlp_layer_types=["hash_moe", "moe", "moe", "moe"],
                        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                         "beta_fast": 32, "beta_slow": 1}),
    "csa_only": dict(layer_types=[CSA] * 4, mlp_layer_types=["moe"] * 4, compress_rates={CSA: 2, HCA: 8},
                     scoring_func="sigmoid", routed_scaling_factor=2.0),
}


def build(path, name: str, **edits):
    """A transformers DeepseekV4ForCausalLM with its zero/one-initialised parts (sinks, position biases,
    hyper-connection weights, hash tables, selection biases, norms) randomised, saved as transformers saves it."""
    randomised(transformers.DeepseekV4Config(**{**SHAPES, **SCHEDULES[name], **edits})).save_pretrained(path)
    return path


def randomised(config):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n and n.endswith("weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif n.endswith(("sinks", "position_bias", "base")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif n.endswith("scale"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif n.endswith("fn"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif n.endswith("gate.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.copy_(torch.rand(b.shape, generator=g) * 0.6 - 0.3)
            elif n.endswith("tid2eid"):
                b.copy_(torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(b.shape[0])]))
    return model


def build_with_mtp(path, name: str, echo: float = 0.0, mtp_kind: str = SLIDE, **edits):
    """`build`'s model with an MTP module in DeepSeek's release layout: a transformers model one layer deeper
    (its last layer a sliding-window, top-k routed block, as the releases' MTP layer is) saved by transformers,
    that layer's tensors renamed `mtp.0.*` and the module's own added (e_proj, h_proj, enorm, hnorm, norm,
    hc_head_*); an MTP layer of another kind (`mtp_kind`) is told in config.json as the release tells it, a
    trailing entry of `compress_ratios`. With `echo` the module tends to draft the token it is given again
    (e_proj the identity, h_proj zero, `echo` x the embedding added to the LM head), so some drafts are
    accepted (where greedy decoding repeats a token). Returns (the directory, the deeper transformers model,
    the module's own torch modules)."""
    from safetensors.torch import load_file, save_file
    main = transformers.DeepseekV4Config(**{**SHAPES, **SCHEDULES[name], **edits})
    n = main.num_hidden_layers
    deeper = randomised(transformers.DeepseekV4Config(**{
        **SHAPES, **SCHEDULES[name], **edits, "num_hidden_layers": n + 1, "layer_types": main.layer_types + [mtp_kind],
        "mlp_layer_types": main.mlp_layer_types + ["moe"]}))
    own = mtp_modules(deeper.config)
    if echo:
        with torch.no_grad():
            deeper.lm_head.weight.add_(deeper.model.embed_tokens.weight * echo)
            own.e_proj.weight.copy_(torch.eye(main.hidden_size) * 4)
            own.h_proj.weight.zero_()
    deeper.save_pretrained(path / "deeper")
    tensors = {(f"mtp.0.{k[len(f'model.layers.{n}.'):]}" if k.startswith(f"model.layers.{n}.") else k): v
               for k, v in load_file(str(path / "deeper" / "model.safetensors")).items()}
    tensors.update({f"mtp.0.{k.replace('hc_head.hc_', 'hc_head_')}": v.detach().clone()
                    for k, v in own.state_dict().items()})
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((path / "deeper" / "config.json").read_text())
    config.update(num_hidden_layers=n, layer_types=main.layer_types, mlp_layer_types=main.mlp_layer_types,
                  num_nextn_predict_layers=1)
    if mtp_kind != SLIDE:
        ratios = {SLIDE: 0, CSA: 4, HCA: 128}
        config["compress_ratios"] = [ratios[t] for t in config.pop("layer_types") + [mtp_kind]]
    (path / "config.json").write_text(json.dumps(config))
    return path, deeper, own


def mtp_modules(config):
    """The MTP module's own parts (DeepSeek's names) from transformers' V4 modules, randomised."""
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4HyperHead, DeepseekV4RMSNorm
    D = config.hidden_size
    own = torch.nn.Module()
    g = torch.Generator().manual_seed(2)
    own.e_proj, own.h_proj = torch.nn.Linear(D, D, bias=False), torch.nn.Linear(D, D, bias=False)
    own.enorm, own.hnorm, own.norm = (DeepseekV4RMSNorm(D, eps=config.rms_norm_eps) for _ in range(3))
    own.hc_head = DeepseekV4HyperHead(config)
    with torch.no_grad():
        for k, p in own.named_parameters():
            p.copy_(torch.rand(p.shape, generator=g) + 0.5 if k.endswith(("norm.weight", "hc_scale")) else
                    torch.randn(p.shape, generator=g) * (0.5 if k.endswith("hc_base") else 0.1 if "hc_" in k
                                                         else D**-0.5))
    return own


def mtp_reference(deeper, own, ids):
    """MTP logits (B, T - 1, V) for `ids` as DeepSeek's MTPBlock composes them, from transformers' modules: the
    main model's streams after its last layer (the deeper model's layer n - 1, hooked), the next tokens'
    embeddings, the deeper model's layer n as the block (at the streams' positions), the module's own head and
    norm, the shared LM head."""
    from transformers.masking_utils import create_sliding_window_causal_mask
    n = deeper.config.num_hidden_layers - 1
    seen = {}
    hook = deeper.model.layers[n - 1].register_forward_hook(lambda module, args, out: seen.setdefault("h", out))
    ids = torch.tensor(ids)
    with torch.no_grad():
        deeper(ids)
        hook.remove()
        streams, following = seen["h"][:, :-1], ids[:, 1:]
        e = deeper.model.embed_tokens(following)
        x = own.h_proj(own.hnorm(streams)) + own.e_proj(own.enorm(e)).unsqueeze(2)
        pos = torch.arange(following.shape[1])[None]
        rope = {k: deeper.model.rotary_emb(e, position_ids=pos, layer_type=k) for k in ("main", "compress")}
        mask = create_sliding_window_causal_mask(config=deeper.config, inputs_embeds=e, attention_mask=None,
                                                 cache=None, position_ids=pos)
        out = deeper.model.layers[n](x, position_embeddings=rope, position_ids=pos, attention_mask=mask,
                                     input_ids=following)
        return deeper.lm_head(own.norm(own.hc_head(out))).numpy()


def reference(path, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def prompt(n: int = 30, batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 97, (batch, n))

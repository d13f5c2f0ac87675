"""Hugging Face DETR built offline with random weights, as the reference for parity tests."""

import numpy as np
from conftest import require


def build_hf_detr(depths=(3, 4, 6, 3), num_labels=91, d_model=256, layers=6, ffn=2048, heads=8, queries=100,
                  hidden_sizes=None, embedding_size=64, seed=0, segmentation=False):
    """A DetrForObjectDetection (DetrForSegmentation with `segmentation`: its mask head's biases and GroupNorm
    affines randomised too) with HF's own ResNet backbone (no timm, no download) in eval mode, its frozen
    batch-norm statistics randomised so that they are not the identity."""
    torch = require("torch")
    transformers = require("transformers")
    torch.manual_seed(seed)
    hidden_sizes = hidden_sizes or [embedding_size * 4 * 2**i for i in range(len(depths))]
    backbone = transformers.ResNetConfig(depths=list(depths), hidden_sizes=hidden_sizes,
                                         embedding_size=embedding_size,
                                         out_features=[f"stage{i + 1}" for i in range(len(depths))][
                                             0 if segmentation else -1:])
    cfg = transformers.DetrConfig(use_timm_backbone=False, backbone_config=backbone, num_labels=num_labels,
                                  d_model=d_model, encoder_layers=layers, decoder_layers=layers,
                                  encoder_ffn_dim=ffn, decoder_ffn_dim=ffn, encoder_attention_heads=heads,
                                  decoder_attention_heads=heads, num_queries=queries, auxiliary_loss=False)
    model = (transformers.DetrForSegmentation if segmentation else transformers.DetrForObjectDetection)(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            n = buf.numel()
            if name.endswith("running_mean"):
                buf.copy_(0.1 * torch.randn(n, generator=g))
            elif name.endswith("running_var"):
                buf.copy_(0.5 + torch.rand(n, generator=g))
            elif name.endswith(".weight") and "normalization" in name:
                buf.copy_(0.5 + torch.rand(n, generator=g))
            elif name.endswith(".bias") and "normalization" in name:
                buf.copy_(0.1 * torch.randn(n, generator=g))
        for name, param in model.named_parameters():
            if name.startswith(("mask_head.", "bbox_attention.")) and name.endswith("bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=g))
            elif name.startswith("mask_head.") and ".norm.weight" in name:
                param.copy_(0.5 + torch.rand(param.shape, generator=g))
    return model


def padded_batch(sizes, seed=0):
    """Normalised images of the given (h, w) sizes, zero-padded to a common size: NHWC pixels, mask True on
    real pixels."""
    rs = np.random.default_rng(seed)
    hmax, wmax = max(h for h, _ in sizes), max(w for _, w in sizes)
    pixels = np.zeros((len(sizes), hmax, wmax, 3), np.float32)
    mask = np.zeros((len(sizes), hmax, wmax), bool)
    for i, (h, w) in enumerate(sizes):
        pixels[i, :h, :w] = rs.standard_normal((h, w, 3))
        mask[i, :h, :w] = True
    return pixels, mask


def hf_all_layers(model, pixels, mask):
    """Logits and boxes of every decoder layer [L, B, Q, *], with the official semantics: each layer's output
    through the final decoder LayerNorm. (HF's own `auxiliary_loss=True` path feeds the normalised output on to
    the next layer, which the official model does not, so it is not used here.)"""
    torch = require("torch")
    with torch.no_grad():
        px = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
        out = model.model(px, pixel_mask=torch.from_numpy(mask).long(), output_hidden_states=True)
        # the last of decoder_hidden_states is the output already through the LayerNorm (a second one is the
        # identity only while the LayerNorm's affine is: a trained model's is not)
        assert torch.equal(out.decoder_hidden_states[-1], out.last_hidden_state)
        hs = torch.stack([model.model.decoder.layernorm(h) for h in out.decoder_hidden_states[1:-1]]
                         + [out.last_hidden_state])
        logits = model.class_labels_classifier(hs)
        boxes = model.bbox_predictor(hs).sigmoid()
    return logits.numpy(), boxes.numpy()


def hf_segmentation(model, pixels, mask):
    """DetrForSegmentation's pred_logits, pred_boxes and pred_masks (the last decoder layer's) as NumPy."""
    torch = require("torch")
    with torch.no_grad():
        out = model(torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), pixel_mask=torch.from_numpy(mask).long())
    return out.logits.numpy(), out.pred_boxes.numpy(), out.pred_masks.numpy()

"""An independent PyTorch reference of the official DETR (facebookresearch/detr): torchvision's ResNet with
optional dilation, FrozenBatchNorm2d, PositionEmbeddingSine(normalize=True), the transformer built on
nn.MultiheadAttention (post- or pre-norm), and the heads. Its state dict has the official checkpoint's keys."""

import math

from conftest import require

torch = require("torch")
nn = torch.nn
F = torch.nn.functional


class FrozenBatchNorm2d(nn.Module):
    def __init__(self, n):
        super().__init__()
        for name, init in (("weight", torch.ones), ("bias", torch.zeros), ("running_mean", torch.zeros),
                           ("running_var", torch.ones)):
            self.register_buffer(name, init(n))

    def forward(self, x):
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1) + 1e-5).rsqrt()
        return x * scale + (self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale)


class Bottleneck(nn.Module):
    def __init__(self, cin, planes, stride, downsample, dilation, norm):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, planes, 1, bias=False), norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = norm(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, planes * 4, 1, bias=False), norm(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """torchvision.models.resnet.ResNet with Bottleneck blocks and replace_stride_with_dilation=[F, F, dc5]."""

    def __init__(self, depths=(3, 4, 6, 3), width=64, dilation=False, norm=FrozenBatchNorm2d, fc=False):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, width, 7, 2, 3, bias=False), norm(width)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.inplanes, self.dilation = width, 1
        for i, depth in enumerate(depths):
            setattr(self, f"layer{i + 1}", self._make_layer(width * 2**i, depth, 1 if i == 0 else 2,
                                                            dilate=dilation and i == 3, norm=norm))
        self.fc = nn.Linear(self.inplanes, 1000) if fc else None

    def _make_layer(self, planes, blocks, stride, dilate, norm):
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, 1, stride, bias=False), norm(planes * 4))
        layers = [Bottleneck(self.inplanes, planes, stride, downsample, previous_dilation, norm)]
        self.inplanes = planes * 4
        layers += [Bottleneck(self.inplanes, planes, 1, None, self.dilation, norm) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def stages(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        outs = []
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
            outs.append(x)
        return outs


def position_embedding_sine(mask, num_pos_feats=128, temperature=10000, scale=2 * math.pi):
    not_mask = ~mask  # official masks are True on padding
    y_embed = not_mask.cumsum(1, dtype=torch.float32)
    x_embed = not_mask.cumsum(2, dtype=torch.float32)
    eps = 1e-6
    y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
    x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32)
    dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
    pos_x = x_embed[:, :, :, None] / dim_t
    pos_y = y_embed[:, :, :, None] / dim_t
    pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class EncoderLayer(nn.Module):
    def __init__(self, d, nhead, ffn, pre):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, nhead, dropout=0.1)
        self.linear1, self.linear2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.pre = pre

    def forward(self, src, key_padding_mask, pos):
        if self.pre:
            x = self.norm1(src)
            src = src + self.self_attn(x + pos, x + pos, x, key_padding_mask=key_padding_mask)[0]
            return src + self.linear2(F.relu(self.linear1(self.norm2(src))))
        src = self.norm1(src + self.self_attn(src + pos, src + pos, src, key_padding_mask=key_padding_mask)[0])
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


class DecoderLayer(nn.Module):
    def __init__(self, d, nhead, ffn, pre):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, nhead, dropout=0.1)
        self.multihead_attn = nn.MultiheadAttention(d, nhead, dropout=0.1)
        self.linear1, self.linear2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.pre = pre

    def forward(self, tgt, memory, key_padding_mask, pos, query_pos):
        if self.pre:
            x = self.norm1(tgt)
            tgt = tgt + self.self_attn(x + query_pos, x + query_pos, x)[0]
            x = self.norm2(tgt)
            tgt = tgt + self.multihead_attn(x + query_pos, memory + pos, memory,
                                            key_padding_mask=key_padding_mask)[0]
            return tgt + self.linear2(F.relu(self.linear1(self.norm3(tgt))))
        tgt = self.norm1(tgt + self.self_attn(tgt + query_pos, tgt + query_pos, tgt)[0])
        tgt = self.norm2(tgt + self.multihead_attn(tgt + query_pos, memory + pos, memory,
                                                   key_padding_mask=key_padding_mask)[0])
        return self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt))))


class Stack(nn.Module):
    def __init__(self, layers, norm):
        super().__init__()
        self.layers, self.norm = nn.ModuleList(layers), norm


class Transformer(nn.Module):
    def __init__(self, d, nhead, enc, dec, ffn, pre):
        super().__init__()
        self.encoder = Stack([EncoderLayer(d, nhead, ffn, pre) for _ in range(enc)], nn.LayerNorm(d) if pre else None)
        self.decoder = Stack([DecoderLayer(d, nhead, ffn, pre) for _ in range(dec)], nn.LayerNorm(d))

    def forward(self, src, mask, query_embed, pos):  # src [B, D, H, W], mask [B, H, W] True on padding
        bs = src.shape[0]
        src, pos = src.flatten(2).permute(2, 0, 1), pos.flatten(2).permute(2, 0, 1)
        query_pos = query_embed.unsqueeze(1).repeat(1, bs, 1)
        mask = mask.flatten(1)
        memory = src
        for layer in self.encoder.layers:
            memory = layer(memory, mask, pos)
        if self.encoder.norm is not None:
            memory = self.encoder.norm(memory)
        out, intermediate = torch.zeros_like(query_pos), []
        for layer in self.decoder.layers:
            out = layer(out, memory, mask, pos, query_pos)
            intermediate.append(self.decoder.norm(out))
        return torch.stack(intermediate).transpose(1, 2), memory  # [L, B, Q, D], [HW, B, D]


class Body(nn.Module):
    def __init__(self, resnet):
        super().__init__()
        self.body = resnet


class MLP(nn.Module):
    def __init__(self, cin, hidden, cout, n):
        super().__init__()
        h = [hidden] * (n - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip([cin] + h, h + [cout]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < len(self.layers) - 1 else layer(x)
        return x


class DETR(nn.Module):
    def __init__(self, num_classes=91, depths=(3, 4, 6, 3), width=64, dilation=False, d=256, nhead=8, enc=6, dec=6,
                 ffn=2048, queries=100, pre_norm=False):
        super().__init__()
        resnet = ResNet(depths, width, dilation)
        self.backbone = nn.Sequential(Body(resnet))
        self.transformer = Transformer(d, nhead, enc, dec, ffn, pre_norm)
        self.input_proj = nn.Conv2d(resnet.inplanes, d, 1)
        self.query_embed = nn.Embedding(queries, d)
        self.class_embed = nn.Linear(d, num_classes + 1)
        self.bbox_embed = MLP(d, d, 4, 3)

    def forward(self, pixels, mask):
        """pixels [B, 3, H, W]; mask [B, H, W] True on padding (the official NestedTensor). -> [L, B, Q, *]."""
        hs = self.decode(pixels, mask)[0]
        return self.class_embed(hs), self.bbox_embed(hs).sigmoid()

    def decode(self, pixels, mask):
        """-> hs [L, B, Q, D], memory [B, D, h, w], the feature mask [B, h, w], the projected features, the
        backbone's stage outputs."""
        feats = self.backbone[0].body.stages(pixels)
        x = feats[-1]
        m = F.interpolate(mask[None].float(), size=x.shape[-2:]).to(torch.bool)[0]
        pos = position_embedding_sine(m, self.query_embed.weight.shape[1] // 2)
        src = self.input_proj(x)
        hs, memory = self.transformer(src, m, self.query_embed.weight, pos)
        return hs, memory.permute(1, 2, 0).reshape(src.shape), m, src, feats


class AttentionMap(nn.Module):
    """The official MHAttentionMap: per-head attention logits of each query over the memory's pixels, one softmax
    over heads and pixels together."""

    def __init__(self, d, nhead):
        super().__init__()
        self.nhead = nhead
        self.q_linear, self.k_linear = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, q, memory, mask):  # q [B, Q, D]; memory [B, D, h, w]; mask [B, h, w] True on padding
        b, nq, d = q.shape
        q = self.q_linear(q).reshape(b, nq, self.nhead, d // self.nhead) / math.sqrt(d / self.nhead)
        k = F.conv2d(memory, self.k_linear.weight[:, :, None, None], self.k_linear.bias)
        k = k.reshape(b, self.nhead, d // self.nhead, *k.shape[-2:])
        w = torch.einsum("bqnc,bnchw->bqnhw", q, k).masked_fill(mask[:, None, None], float("-inf"))
        return F.softmax(w.flatten(2), -1).reshape(w.shape)


class MaskHead(nn.Module):
    """The official MaskHeadSmallConv: conv3x3-GroupNorm(8)-ReLU stages, nearest upsampling onto 1x1-adapted
    backbone features (layer3, layer2, layer1), one output channel."""

    def __init__(self, dim, fpn_dims, ctx):
        super().__init__()
        widths = [dim, ctx // 2, ctx // 4, ctx // 8, ctx // 16]
        for i, (a, b) in enumerate(zip([dim] + widths[:4], widths), 1):
            setattr(self, f"lay{i}", nn.Conv2d(a, b, 3, padding=1))
            setattr(self, f"gn{i}", nn.GroupNorm(min(8, b), b))
        self.out_lay = nn.Conv2d(widths[4], 1, 3, padding=1)
        for i, f in enumerate(fpn_dims, 1):
            setattr(self, f"adapter{i}", nn.Conv2d(f, widths[i], 1))

    def forward(self, x, att, fpns):  # x [B, D, h, w]; att [B, Q, N, h, w]; fpns [B, C, hi, wi] (layer3, 2, 1)
        nq = att.shape[1]
        rep = lambda t: t.repeat_interleave(nq, 0)  # [B * Q, ...]
        x = torch.cat([rep(x), att.flatten(0, 1)], 1)
        x = F.relu(self.gn2(self.lay2(F.relu(self.gn1(self.lay1(x))))))
        for i, fpn in enumerate(fpns, 1):
            f = rep(getattr(self, f"adapter{i}")(fpn))
            x = f + F.interpolate(x, size=f.shape[-2:], mode="nearest")
            x = F.relu(getattr(self, f"gn{i + 2}")(getattr(self, f"lay{i + 2}")(x)))
        return self.out_lay(x).reshape(-1, nq, *x.shape[-2:])


class DETRsegm(nn.Module):
    """The official panoptic model: a DETR under `detr.`, the attention map and the mask head beside it."""

    def __init__(self, **kw):
        super().__init__()
        self.detr = DETR(**kw)
        d, nhead = kw.get("d", 256), kw.get("nhead", 8)
        c5 = self.detr.input_proj.in_channels
        self.bbox_attention = AttentionMap(d, nhead)
        self.mask_head = MaskHead(d + nhead, [c5 // 2, c5 // 4, c5 // 8], d)

    def forward(self, pixels, mask):
        """-> logits [L, B, Q, C + 1], boxes [L, B, Q, 4], masks [B, Q, H / 4, W / 4]."""
        hs, memory, m, src, feats = self.detr.decode(pixels, mask)
        masks = self.mask_head(src, self.bbox_attention(hs[-1], memory, m), feats[2::-1])
        return self.detr.class_embed(hs), self.detr.bbox_embed(hs).sigmoid(), masks


def randomise_batch_norm(module, seed=0):
    """Frozen batch-norm statistics that are not the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d)):
                n = m.running_mean.numel()
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
    return module


def post_process_panoptic(logits, masks, size, target_size, is_thing, threshold=0.85):
    """The official PostProcessPanoptic for one unpadded image: logits [Q, C + 1], masks [Q, h / 4, w / 4]
    (tensors) -> (id map [H, W] with the official 0-based segment ids, segments_info)."""
    from collections import defaultdict

    import numpy as np
    from PIL import Image

    from detrax.data.masks import id2rgb, rgb2id

    scores, labels = logits.softmax(-1).max(-1)
    keep = labels.ne(logits.shape[-1] - 1) & (scores > threshold)
    s, c = scores[keep], labels[keep]
    m = F.interpolate(masks[keep][None], size=size, mode="bilinear").squeeze(0).flatten(1)  # [K, h * w]
    stuff = defaultdict(list)
    for k, lab in enumerate(c.tolist()):
        if not is_thing[lab]:
            stuff[lab].append(k)

    def ids_area(m, n, dedup):
        if m.shape[0] == 0:
            mid = torch.zeros(size, dtype=torch.long)
        else:
            mid = m.transpose(0, 1).softmax(-1).argmax(-1).view(*size)
        if dedup:
            for eq in stuff.values():
                for e in eq[1:] if len(eq) > 1 else []:
                    mid.masked_fill_(mid.eq(e), eq[0])
        img = Image.fromarray(id2rgb(mid.numpy())).resize(tuple(target_size[::-1]), resample=Image.NEAREST)
        mid = rgb2id(np.asarray(img))
        return [int((mid == i).sum()) for i in range(n)], mid

    area, mid = ids_area(m, len(s), True)
    while c.numel() > 0:
        small = torch.tensor([a <= 4 for a in area], dtype=torch.bool)
        if not small.any():
            break
        s, c, m = s[~small], c[~small], m[~small]
        area, mid = ids_area(m, len(s), False)
    segments = [{"id": i, "category_id": int(c[i]), "isthing": is_thing[int(c[i])], "area": a}
                for i, a in enumerate(area)]
    return mid, segments


def loss_masks(pred_masks, target_masks, indices, num_boxes, alpha=0.25, gamma=2):
    """The official SetCriterion.loss_masks: pred_masks [B, Q, h, w]; target_masks a list of [n_i, H_i, W_i]
    (padded together as a NestedTensor); indices a list of (query indices, target indices) per image."""
    b = len(target_masks)
    n, hh, ww = (max(m.shape[k] for m in target_masks) for k in range(3))
    padded = torch.zeros(b, n, hh, ww)
    for i, m in enumerate(target_masks):
        padded[i, :m.shape[0], :m.shape[1], :m.shape[2]] = m
    img = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(indices)])
    src = pred_masks[img, torch.cat([q for q, _ in indices])]
    tgt = padded[img, torch.cat([t for _, t in indices])].flatten(1)
    src = F.interpolate(src[:, None], size=(hh, ww), mode="bilinear", align_corners=False)[:, 0].flatten(1)
    prob = src.sigmoid()
    ce = F.binary_cross_entropy_with_logits(src, tgt, reduction="none")
    p_t = prob * tgt + (1 - prob) * (1 - tgt)
    focal = (alpha * tgt + (1 - alpha) * (1 - tgt)) * ce * (1 - p_t) ** gamma
    dice = 1 - (2 * (prob * tgt).sum(1) + 1) / (prob.sum(-1) + tgt.sum(-1) + 1)
    return focal.mean(1).sum() / num_boxes, dice.sum() / num_boxes

"""GroundingDINO's encoder-decoder (``transformer.*`` of the release).

Encoder layer = image-text fusion (bi-directional cross-attention with layer
scale) -> text enhancer (text self-attention inside phrases) -> multi-scale
deformable self-attention over the flattened image levels. Two-stage query
selection: every image token proposes a box; the ``num_queries`` tokens whose
best token-text similarity is highest seed the decoder's reference boxes.
Decoder layer = query self-attention -> text cross-attention -> deformable
cross-attention into the image -> FFN; each layer refines the reference boxes.

Multi-scale deformable attention is pure torch (``grid_sample``), so the graph
exports to ONNX (GridSample) and needs no custom CUDA kernel. Level shapes are
Python ints read from the feature maps, never data-dependent control flow.
Names and numerics follow the original release (``inverse_sigmoid`` clamps at
1e-3, -50000/50000 clamps in the fusion attention, -100 window masks in Swin).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GroundingTransformer", "MLP", "inverse_sigmoid", "sine_embedding"]

Shapes = list[tuple[int, int]]


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def sine_embedding(coords: torch.Tensor, num_feats: int, temperature: float = 10000.0) -> torch.Tensor:
    """[..., n] -> [..., n * num_feats]: per coordinate, interleaved sin/cos of coord * 2pi / temperature^(2i/d).

    Computed in float32 at least (integer positions included), as the release computes it.
    """
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=coords.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    angles = coords[..., None] * (2 * math.pi) / dim_t
    embedded = torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), -1).flatten(-2)
    return embedded.flatten(-2)


class MLP(nn.Module):
    """Linear layers with ReLU between them (box heads, reference-point head)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class PackedAttention(nn.Module):
    """Multi-head attention with one packed q/k/v projection (``in_proj_weight``), as torch's MHA stores it."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q, k, v = (F.linear(x, w, b).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
                   for x, w, b in ((query, w_q, b_q), (key, w_k, b_k), (value, w_v, b_v)))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if bias is not None:
            scores = scores + bias
        return self.out_proj((scores.softmax(-1) @ v).transpose(1, 2).flatten(2))


def padding_bias(padding: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Key padding [B, L] (True = padding) -> additive bias [B, 1, 1, L]."""
    return torch.zeros(padding.shape, dtype=dtype, device=padding.device).masked_fill(
        padding, torch.finfo(dtype).min)[:, None, None]


def deformable_sample(value: torch.Tensor, shapes: Shapes, locations: torch.Tensor,
                      weights: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of each level, weighted and summed.

    value [B, S, heads, dh]; locations [B, Q, heads, levels, points, 2] in [0, 1] (x, y);
    weights [B, Q, heads, levels, points] -> [B, Q, heads * dh].
    """
    batch, _, heads, head_dim = value.shape
    queries, levels, points = locations.shape[1], locations.shape[3], locations.shape[4]
    grids = 2 * locations - 1
    sampled, start = [], 0
    for level, (height, width) in enumerate(shapes):
        level_value = value[:, start:start + height * width].flatten(2).transpose(1, 2)
        level_value = level_value.reshape(batch * heads, head_dim, height, width)
        level_grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)  # [B*heads, Q, points, 2]
        sampled.append(F.grid_sample(level_value, level_grid, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))  # [B*heads, dh, Q, points]
        start += height * width
    weights = weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
    output = (torch.stack(sampled, -2).flatten(-2) * weights).sum(-1)
    return output.view(batch, heads * head_dim, queries).transpose(1, 2)


class MSDeformAttn(nn.Module):
    """Each query attends to ``points`` sampled locations per head and level around its reference."""

    def __init__(self, dim: int, levels: int, heads: int, points: int):
        super().__init__()
        self.levels, self.heads, self.points = levels, heads, points
        self.sampling_offsets = nn.Linear(dim, heads * levels * points * 2)
        self.attention_weights = nn.Linear(dim, heads * levels * points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, reference: torch.Tensor, value: torch.Tensor, shapes: Shapes,
                padding: torch.Tensor) -> torch.Tensor:
        """query [B, Q, d]; reference [B, Q, levels, 2 (x, y) or 4 (cx, cy, w, h)]; value [B, S, d]."""
        batch, queries, _ = query.shape
        value = self.value_proj(value).masked_fill(padding[..., None], 0.0)
        value = value.view(batch, value.shape[1], self.heads, -1)
        offsets = self.sampling_offsets(query).view(batch, queries, self.heads, self.levels, self.points, 2)
        weights = self.attention_weights(query).view(batch, queries, self.heads, self.levels * self.points)
        weights = weights.softmax(-1).view(batch, queries, self.heads, self.levels, self.points)
        if reference.shape[-1] == 2:  # points: offsets are in pixels of each level
            # divided level by level by plain ints, so symbolic sizes stay symbolic in an export
            in_pixels = [torch.stack([offsets[:, :, :, level, :, 0] / w, offsets[:, :, :, level, :, 1] / h], -1)
                         for level, (h, w) in enumerate(shapes)]
            locations = reference[:, :, None, :, None] + torch.stack(in_pixels, 3)
        else:  # boxes: offsets scale with the box size
            locations = (reference[:, :, None, :, None, :2]
                         + offsets / self.points * reference[:, :, None, :, None, 2:] * 0.5)
        return self.output_proj(deformable_sample(value, shapes, locations, weights))


class DeformableEncoderLayer(nn.Module):
    def __init__(self, dim: int, ffn: int, levels: int, heads: int, points: int):
        super().__init__()
        self.self_attn = MSDeformAttn(dim, levels, heads, points)
        self.norm1 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn)
        self.linear2 = nn.Linear(ffn, dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, image: torch.Tensor, pos: torch.Tensor, reference: torch.Tensor, shapes: Shapes,
                padding: torch.Tensor) -> torch.Tensor:
        image = self.norm1(image + self.self_attn(image + pos, reference, image, shapes, padding))
        return self.norm2(image + self.linear2(F.relu(self.linear1(image))))


class TextEnhancerLayer(nn.Module):
    """Post-LN self-attention over text tokens, restricted to each token's phrase."""

    def __init__(self, dim: int, heads: int, ffn: int):
        super().__init__()
        self.self_attn = PackedAttention(dim, heads)
        self.linear1 = nn.Linear(dim, ffn)
        self.linear2 = nn.Linear(ffn, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, text: torch.Tensor, pos: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        query = text + pos
        text = self.norm1(text + self.self_attn(query, query, text, bias))
        return self.norm2(text + self.linear2(F.relu(self.linear1(text))))


class BiMultiHeadAttention(nn.Module):
    """Image->text and text->image attention sharing one similarity matrix."""

    def __init__(self, image_dim: int, text_dim: int, embed_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (embed_dim // heads) ** -0.5
        self.v_proj = nn.Linear(image_dim, embed_dim)
        self.l_proj = nn.Linear(text_dim, embed_dim)
        self.values_v_proj = nn.Linear(image_dim, embed_dim)
        self.values_l_proj = nn.Linear(text_dim, embed_dim)
        self.out_v_proj = nn.Linear(embed_dim, image_dim)
        self.out_l_proj = nn.Linear(embed_dim, text_dim)

    def forward(self, image: torch.Tensor, text: torch.Tensor, image_padding: torch.Tensor,
                text_padding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        scores = heads(self.v_proj(image) * self.scale) @ heads(self.l_proj(text)).transpose(-1, -2)
        # the release's fp16 guards: shift by the global max, clamp to +-50000
        scores = (scores - scores.max()).clamp(-50000, 50000)
        scores_text = scores.transpose(-1, -2)
        scores_text = (scores_text - scores_text.max(-1, keepdim=True).values).clamp(-50000, 50000)
        scores_text = scores_text.masked_fill(image_padding[:, None, None, :], float("-inf"))
        scores = scores.masked_fill(text_padding[:, None, None, :], float("-inf"))
        image_out = (scores.softmax(-1) @ heads(self.values_l_proj(text))).transpose(1, 2).flatten(2)
        text_out = (scores_text.softmax(-1) @ heads(self.values_v_proj(image))).transpose(1, 2).flatten(2)
        return self.out_v_proj(image_out), self.out_l_proj(text_out)


class BiAttentionBlock(nn.Module):
    """Pre-LN fusion with layer scale: x = ln(x) + gamma * attention(ln(x)) for both modalities."""

    def __init__(self, dim: int, embed_dim: int, heads: int):
        super().__init__()
        self.layer_norm_v = nn.LayerNorm(dim)
        self.layer_norm_l = nn.LayerNorm(dim)
        self.attn = BiMultiHeadAttention(dim, dim, embed_dim, heads)
        self.gamma_v = nn.Parameter(torch.full((dim,), 1e-4))
        self.gamma_l = nn.Parameter(torch.full((dim,), 1e-4))

    def forward(self, image: torch.Tensor, text: torch.Tensor, image_padding: torch.Tensor,
                text_padding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image, text = self.layer_norm_v(image), self.layer_norm_l(text)
        delta_image, delta_text = self.attn(image, text, image_padding, text_padding)
        return image + self.gamma_v * delta_image, text + self.gamma_l * delta_text


class GroundingEncoder(nn.Module):
    def __init__(self, num_layers: int, dim: int, heads: int, ffn: int, levels: int, points: int):
        super().__init__()
        self.dim = dim
        self.layers = nn.ModuleList(DeformableEncoderLayer(dim, ffn, levels, heads, points)
                                    for _ in range(num_layers))
        self.text_layers = nn.ModuleList(TextEnhancerLayer(dim, heads // 2, ffn // 2) for _ in range(num_layers))
        self.fusion_layers = nn.ModuleList(BiAttentionBlock(dim, ffn // 2, heads // 2) for _ in range(num_layers))

    @staticmethod
    def reference_points(shapes: Shapes, valid_ratios: torch.Tensor) -> torch.Tensor:
        """Centre of every image token, normalised to the valid area: [B, S, levels, 2] (x, y)."""
        points = []
        for level, (height, width) in enumerate(shapes):
            ys = torch.arange(height, dtype=valid_ratios.dtype, device=valid_ratios.device) + 0.5
            xs = torch.arange(width, dtype=valid_ratios.dtype, device=valid_ratios.device) + 0.5
            ref_y, ref_x = torch.meshgrid(ys, xs, indexing="ij")
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * height)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * width)
            points.append(torch.stack((ref_x, ref_y), -1))
        return torch.cat(points, 1)[:, :, None] * valid_ratios[:, None]

    def forward(self, image: torch.Tensor, pos: torch.Tensor, shapes: Shapes, valid_ratios: torch.Tensor,
                image_padding: torch.Tensor, text: torch.Tensor, text_padding: torch.Tensor,
                text_position_ids: torch.Tensor, text_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        reference = self.reference_points(shapes, valid_ratios)
        text_pos = sine_embedding(text_position_ids[..., None], self.dim).to(text.dtype)
        text_bias = torch.zeros(text_mask.shape, dtype=text.dtype, device=text.device)
        text_bias = text_bias.masked_fill(~text_mask, float("-inf"))[:, None]
        for fusion, text_layer, layer in zip(self.fusion_layers, self.text_layers, self.layers):
            image, text = fusion(image, text, image_padding, text_padding)
            text = text_layer(text, text_pos, text_bias)
            image = layer(image, pos, reference, shapes, image_padding)
        return image, text


class DeformableDecoderLayer(nn.Module):
    def __init__(self, dim: int, ffn: int, levels: int, heads: int, points: int):
        super().__init__()
        self.cross_attn = MSDeformAttn(dim, levels, heads, points)
        self.norm1 = nn.LayerNorm(dim)
        self.ca_text = PackedAttention(dim, heads)
        self.catext_norm = nn.LayerNorm(dim)
        self.self_attn = PackedAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn)
        self.linear2 = nn.Linear(ffn, dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, queries: torch.Tensor, query_pos: torch.Tensor, reference: torch.Tensor,
                text: torch.Tensor, text_bias: torch.Tensor, image: torch.Tensor, image_padding: torch.Tensor,
                shapes: Shapes) -> torch.Tensor:
        q = queries + query_pos
        queries = self.norm2(queries + self.self_attn(q, q, queries))
        queries = self.catext_norm(queries + self.ca_text(queries + query_pos, text, text, text_bias))
        queries = self.norm1(queries + self.cross_attn(queries + query_pos, reference, image, shapes, image_padding))
        return self.norm3(queries + self.linear2(F.relu(self.linear1(queries))))


class GroundingDecoder(nn.Module):
    def __init__(self, num_layers: int, dim: int, heads: int, ffn: int, levels: int, points: int,
                 bbox_embed: nn.ModuleList):
        super().__init__()
        self.layers = nn.ModuleList(DeformableDecoderLayer(dim, ffn, levels, heads, points)
                                    for _ in range(num_layers))
        self.dim = dim
        self.norm = nn.LayerNorm(dim)
        self.ref_point_head = MLP(2 * dim, dim, dim, 2)
        self.bbox_embed = bbox_embed  # the model's box head, shared: it refines the references between layers

    def forward(self, queries: torch.Tensor, reference_logits: torch.Tensor, image: torch.Tensor,
                image_padding: torch.Tensor, shapes: Shapes, valid_ratios: torch.Tensor, text: torch.Tensor,
                text_padding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (normed output of the last layer [B, Q, d], the reference boxes that layer saw [B, Q, 4])."""
        reference = reference_logits.sigmoid()
        text_bias = padding_bias(text_padding, text.dtype)
        box_ratios = torch.cat([valid_ratios, valid_ratios], -1)[:, None]
        for i, layer in enumerate(self.layers):
            if i > 0:
                reference = (self.bbox_embed[i - 1](queries) + inverse_sigmoid(reference)).sigmoid()
            scaled = reference[:, :, None] * box_ratios  # [B, Q, levels, 4]
            # (y, x, w, h) order of the release's query sine embedding
            sine = sine_embedding(scaled[:, :, 0][..., [1, 0, 2, 3]], self.dim // 2).to(queries.dtype)
            queries = layer(queries, self.ref_point_head(sine), scaled, text, text_bias, image, image_padding,
                            shapes)
        return self.norm(queries), reference


def encoder_proposals(memory: torch.Tensor, padding: torch.Tensor,
                      shapes: Shapes) -> tuple[torch.Tensor, torch.Tensor]:
    """One box per image token (its cell centre, side 0.05 * 2^level) as logits; inf where unusable."""
    batch = memory.shape[0]
    proposals, start = [], 0
    for level, (height, width) in enumerate(shapes):
        level_padding = padding[:, start:start + height * width].view(batch, height, width)
        valid_h = (~level_padding[:, :, 0]).sum(1)
        valid_w = (~level_padding[:, 0, :]).sum(1)
        grid_y, grid_x = torch.meshgrid(torch.arange(height, dtype=memory.dtype, device=memory.device),
                                        torch.arange(width, dtype=memory.dtype, device=memory.device),
                                        indexing="ij")
        grid = torch.stack([grid_x, grid_y], -1)[None]
        scale = torch.stack([valid_w, valid_h], -1).view(batch, 1, 1, 2)
        grid = (grid + 0.5) / scale
        size = torch.full_like(grid, 0.05 * 2.0 ** level)
        proposals.append(torch.cat((grid, size), -1).view(batch, -1, 4))
        start += height * width
    proposals = torch.cat(proposals, 1)
    usable = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True) & ~padding[..., None]
    logits = torch.log(proposals / (1 - proposals)).masked_fill(~usable, float("inf"))
    return memory.masked_fill(~usable, 0.0), logits


def token_similarity(queries: torch.Tensor, text: torch.Tensor, text_padding: torch.Tensor,
                     max_text_len: int) -> torch.Tensor:
    """Contrastive class logits: query . token, -inf on padding and past the caption: [B, Q, max_text_len]."""
    logits = (queries @ text.transpose(-1, -2)).masked_fill(text_padding[:, None, :], float("-inf"))
    return F.pad(logits, (0, max_text_len - logits.shape[-1]), value=float("-inf"))


class GroundingTransformer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: int, num_encoder_layers: int, num_decoder_layers: int,
                 num_queries: int, levels: int, encoder_points: int, decoder_points: int, max_text_len: int):
        super().__init__()
        self.num_queries = num_queries
        self.max_text_len = max_text_len
        self.level_embed = nn.Parameter(torch.randn(levels, dim))
        self.encoder = GroundingEncoder(num_encoder_layers, dim, heads, ffn, levels, encoder_points)
        # one box MLP for every decoder layer, as the release shares it (dec_pred_bbox_embed_share)
        box_head = MLP(dim, dim, 4, 3)
        self.decoder = GroundingDecoder(num_decoder_layers, dim, heads, ffn, levels, decoder_points,
                                        nn.ModuleList([box_head] * num_decoder_layers))
        self.tgt_embed = nn.Embedding(num_queries, dim)
        self.enc_output = nn.Linear(dim, dim)
        self.enc_output_norm = nn.LayerNorm(dim)
        self.enc_out_bbox_embed = MLP(dim, dim, 4, 3)

    def forward(self, sources: list[torch.Tensor], paddings: list[torch.Tensor], positions: list[torch.Tensor],
                text: torch.Tensor, text_padding: torch.Tensor, text_position_ids: torch.Tensor,
                text_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per level [B, d, h, w] maps, padding [B, h, w], positions [B, d, h, w] ->
        (decoder output [B, Q, d], the boxes its last layer refined [B, Q, 4], encoded text [B, L, d])."""
        shapes = [(source.shape[-2], source.shape[-1]) for source in sources]
        image = torch.cat([source.flatten(2).transpose(1, 2) for source in sources], 1)
        padding = torch.cat([pad.flatten(1) for pad in paddings], 1)
        pos = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[level]
                         for level, p in enumerate(positions)], 1)
        valid_ratios = torch.stack([valid_ratio(pad, image.dtype) for pad in paddings], 1)
        memory, text = self.encoder(image, pos, shapes, valid_ratios, padding, text, text_padding,
                                    text_position_ids, text_mask)

        proposal_memory, proposal_logits = encoder_proposals(memory, padding, shapes)
        proposal_memory = self.enc_output_norm(self.enc_output(proposal_memory))
        scores = token_similarity(proposal_memory, text, text_padding, self.max_text_len).max(-1).values
        box_logits = self.enc_out_bbox_embed(proposal_memory) + proposal_logits
        chosen = torch.topk(scores, self.num_queries, dim=1).indices
        reference_logits = torch.gather(box_logits, 1, chosen[..., None].expand(-1, -1, 4))
        queries = self.tgt_embed.weight[None].expand(memory.shape[0], -1, -1)
        queries, reference = self.decoder(queries, reference_logits, memory, padding, shapes, valid_ratios, text,
                                          text_padding)
        return queries, reference, text


def valid_ratio(padding: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, h, w] padding -> [B, 2]: share of valid columns and rows (x, y)."""
    height, width = padding.shape[-2:]
    valid_h = (~padding[:, :, 0]).sum(1).to(dtype) / height
    valid_w = (~padding[:, 0, :]).sum(1).to(dtype) / width
    return torch.stack([valid_w, valid_h], -1)

"""Multi-branch image encoders on an open_clip ViT (Wang et al., "Advancing Myopia to Holism:
Fully Contrastive Language-Image Pre-training", CVPR 2025, arXiv 2412.00440).

Two designs, both low-parameter:

* ``cls`` (Psi_CLS): H class tokens, each with its own embedding and positional row. Class
  token i attends to itself and to all patches, never to class token j != i (an additive -inf
  mask; the research code added a 0/1 float mask, which blocks nothing). Patches see all.
* ``mlp`` (Psi_MLP): in the last L blocks the token stream forks into H streams; attention,
  LayerNorms and the first MLP linear layer are shared, the second MLP linear layer is
  replicated per branch. The first forked block computes its shared part once, because the
  streams are identical until its second MLP layer.

Both read each branch's class token through the shared ``ln_post`` and ``proj``. Token states
of chosen blocks come from ``forward_intermediates`` (as in open_clip and timm); ``dense`` and
``attention_maps`` read the last block from its input state.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from open_clip.utils import feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import ENCODERS  # defined in models/__init__, free of torch, for the config check


class BranchLinear(nn.Module):
    """H independent linear layers applied to H streams (or to one shared input)."""

    def __init__(self, num_branches: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_branches, out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(num_branches, out_features))
        bound = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(self.weight, -bound, bound)

    @classmethod
    def from_linear(cls, linear: nn.Linear, num_branches: int) -> "BranchLinear":
        layer = cls(num_branches, linear.in_features, linear.out_features)
        with torch.no_grad():
            layer.weight.copy_(linear.weight.unsqueeze(0).expand_as(layer.weight))
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.unsqueeze(0).expand_as(layer.bias))
        return layer.to(linear.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, in) shared -> (H, B, T, out); (H, B, T, in) -> (H, B, T, out)."""
        num_branches, out_features, in_features = self.weight.shape
        if x.dim() == 3:  # one GEMM against all branches' weights at once
            y = F.linear(x, self.weight.reshape(-1, in_features), self.bias.reshape(-1))
            return y.view(*x.shape[:2], num_branches, out_features).permute(2, 0, 1, 3)
        flat = x.reshape(num_branches, -1, in_features)
        y = torch.baddbmm(self.bias.unsqueeze(1), flat, self.weight.transpose(1, 2))
        return y.view(*x.shape[:3], out_features)


def check_supported(vit: VisionTransformer) -> None:
    if not isinstance(vit, VisionTransformer):
        raise ValueError(f"holiclip needs an open_clip VisionTransformer image tower, got {type(vit).__name__}")
    if vit.attn_pool is not None or vit.pool_type != "tok" or vit.final_ln_after_pool:
        raise ValueError("holiclip supports class-token pooling only (no attentional/avg pooling)")
    if not isinstance(vit.patch_dropout, nn.Identity):
        raise ValueError("patch_dropout is not supported with several class tokens")
    for blk in vit.transformer.resblocks:
        if not isinstance(blk, ResidualAttentionBlock):
            raise ValueError("holiclip supports open_clip's default ResidualAttentionBlock only")


class MultiBranchViT(nn.Module):
    """An open_clip ``VisionTransformer`` with H output branches.

    Parameters keep open_clip's names (``conv1``, ``class_embedding``, ...); only the shapes of
    ``class_embedding`` (H, W), ``positional_embedding`` (H + P, W) for ``cls`` and the forked
    blocks' ``mlp.c_proj`` (a :class:`BranchLinear`) for ``mlp`` differ.
    """

    def __init__(self, vit: VisionTransformer, num_branches: int, encoder: str = "cls", mlp_layers: int = 3):
        super().__init__()
        check_supported(vit)
        if encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {ENCODERS}, got {encoder!r}")
        if num_branches < 1:
            raise ValueError("need at least one branch")
        layers = len(vit.transformer.resblocks)
        if encoder == "mlp" and not 1 <= mlp_layers <= layers:
            raise ValueError(f"mlp_layers must be in [1, {layers}], got {mlp_layers}")
        self.encoder = encoder
        self.num_branches = num_branches
        self.num_prefix_tokens = num_branches if encoder == "cls" else 1  # timm's name: tokens before the patches
        self.fork_at = layers - mlp_layers if encoder == "mlp" else layers
        self.grid_size = vit.grid_size
        self.image_size = vit.image_size
        self.output_dim = vit.output_dim

        self.conv1 = vit.conv1
        self.ln_pre = vit.ln_pre
        self.transformer = vit.transformer
        self.ln_post = vit.ln_post
        self.proj = vit.proj
        width = vit.class_embedding.shape[-1]
        pos = vit.positional_embedding.data
        prefix = self.num_prefix_tokens
        self.class_embedding = nn.Parameter(vit.class_embedding.data.reshape(1, width).repeat(prefix, 1))
        self.positional_embedding = nn.Parameter(torch.cat([pos[:1].repeat(prefix, 1), pos[1:]], 0))
        self.positional_embedding.requires_grad_(vit.positional_embedding.requires_grad)
        if encoder == "mlp":
            for blk in self.transformer.resblocks[self.fork_at:]:
                blk.mlp.c_proj = BranchLinear.from_linear(blk.mlp.c_proj, num_branches)
        # built once and moved with the model: a mask made (or cached in a dict) in forward would be
        # a new guard for torch.compile on every call, i.e. a recompile
        tokens = self.num_prefix_tokens + self.grid_size[0] * self.grid_size[1]
        self.register_buffer("cls_mask", self._build_mask(tokens) if encoder == "cls" and num_branches > 1 else None,
                             persistent=False)

    @torch.no_grad()
    def init_branches(self) -> None:
        """From scratch, each branch starts from its own random draw, as in the research code, so
        the branches differ before the first step: class tokens and their positional rows from
        open_clip's N(0, width^-1/2), Psi_MLP's replicated ``c_proj`` from nn.Linear's default
        init. Branch 0 keeps the tower's own draw (H = 1 stays open_clip's model).
        Pretrained weights are copied into every branch instead (see the constructor)."""
        width = self.class_embedding.shape[-1]
        scale = width ** -0.5
        self.class_embedding[1:].normal_(0.0, scale)
        if self.positional_embedding.requires_grad:  # a fixed sin-cos table stays as it is
            self.positional_embedding[1: self.num_prefix_tokens].normal_(0.0, scale)
        for blk in self.transformer.resblocks[self.fork_at:]:
            layer = blk.mlp.c_proj
            for h in range(1, self.num_branches):
                fresh = nn.Linear(layer.weight.shape[2], layer.weight.shape[1])
                layer.weight[h].copy_(fresh.weight)
                layer.bias[h].copy_(fresh.bias)

    # -- helpers ---------------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        return {"class_embedding"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def _build_mask(self, num_tokens: int) -> torch.Tensor:
        mask = torch.zeros(num_tokens, num_tokens)
        h = self.num_branches
        mask[:h, :h] = torch.full((h, h), float("-inf")).fill_diagonal_(0.0)
        return mask

    def attn_mask(self, num_tokens: int, like: torch.Tensor) -> torch.Tensor | None:
        """Additive mask: class token i may not attend to class token j != i (in ``like``'s dtype)."""
        if self.cls_mask is None:
            return None
        if num_tokens != self.cls_mask.shape[0]:
            raise ValueError(f"{num_tokens} tokens, but this tower's class tokens and patches make "
                             f"{self.cls_mask.shape[0]}: images of another size than {self.image_size}?")
        return self.cls_mask.to(like.dtype)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv1(images.to(self.conv1.weight.dtype))
        x = x.flatten(2).transpose(1, 2)  # (B, P, W)
        cls = self.class_embedding.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.ln_pre(x)

    def _run(self, fn, *args):
        if self.transformer.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    @staticmethod
    def _attend(blk: ResidualAttentionBlock, x: torch.Tensor, mask, num_queries: int | None = None) -> torch.Tensor:
        """Residual attention; with ``num_queries`` only the first tokens are updated (and returned)."""
        kv = blk.ln_1(x)
        if num_queries is None:
            return x + blk.ls_1(blk.attention(q_x=kv, attn_mask=mask))
        q = kv[:, :num_queries]
        mask = mask[:num_queries] if mask is not None else None
        return x[:, :num_queries] + blk.ls_1(blk.attention(q_x=q, k_x=kv, v_x=kv, attn_mask=mask))

    def _block(self, blk: ResidualAttentionBlock, x: torch.Tensor, mask, num_queries: int | None) -> torch.Tensor:
        x = self._attend(blk, x, mask, num_queries)
        return x + blk.ls_2(blk.mlp(blk.ln_2(x)))

    def _forked_block(self, blk: ResidualAttentionBlock, x: torch.Tensor, num_queries: int | None) -> torch.Tensor:
        """x: (B, T, W) before the fork (first forked block) or (H, B, T, W) after it."""
        streams = x.dim() == 4
        flat = x.flatten(0, 1) if streams else x
        flat = self._attend(blk, flat, None, num_queries)
        hidden = blk.mlp.gelu(blk.mlp.c_fc(blk.ln_2(flat)))
        if streams:
            hidden = hidden.view(*x.shape[:2], *hidden.shape[1:])
            base = flat.view(*x.shape[:2], *flat.shape[1:])
        else:
            base = flat.unsqueeze(0)
        return base + blk.ls_2(blk.mlp.c_proj(hidden))

    def _apply_block(self, index: int, x: torch.Tensor, mask, num_queries: int | None = None) -> torch.Tensor:
        blk = self.transformer.resblocks[index]
        if index < self.fork_at:
            return self._run(lambda t: self._block(blk, t, mask, num_queries), x)
        return self._run(lambda t: self._forked_block(blk, t, num_queries), x)

    def _run_blocks(self, images: torch.Tensor, take=(), end: int | None = None):
        """Runs blocks [0, end) and returns (last state, states after the blocks in ``take``).

        When the last block runs and its output is not taken, it updates only the class tokens
        (all that the embeddings read): the patch tokens' attention output and MLP are skipped
        there, with the same embeddings as a full pass.
        """
        x = self.embed(images)
        mask = self.attn_mask(x.shape[1], x)
        last = len(self.transformer.resblocks) - 1
        end = last + 1 if end is None else end
        states = []
        for i in range(end):
            prefix_only = i == last and i not in take
            x = self._apply_block(i, x, mask, self.num_prefix_tokens if prefix_only else None)
            if i in take:
                states.append(x)
        return x, states

    def forward_intermediates(
        self,
        images: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        stop_early: bool = False,
        normalize_intermediates: bool = False,
        intermediates_only: bool = False,
    ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Token states after the requested blocks, in the manner of open_clip's and timm's
        ``forward_intermediates``.

        ``indices``: the last n blocks for an int n, all blocks for None, else block indices
        (negative ones count from the end). Returns ``image_intermediates``, the states in block
        order, and (unless ``intermediates_only``) ``image_features``, the un-normalised branch
        embeddings (B, H, D) of :meth:`forward`. A state holds every token, the
        ``num_prefix_tokens`` class tokens first, then the patches in row-major order:
        (B, T, W), or (H, B, T, W) for Psi_MLP's forked blocks (one stream per branch).
        Unlike open_clip's default, patches are not split off or laid out as a grid, because
        the branches' class tokens and streams are part of the state.

        ``normalize_intermediates`` applies the shared ``ln_post``. ``stop_early`` skips the
        blocks after the last requested one when only intermediates are asked for (the final
        embeddings need every block).
        """
        blocks = len(self.transformer.resblocks)
        take, max_index = feature_take_indices(blocks, indices)
        end = max_index + 1 if stop_early and intermediates_only else blocks
        x, states = self._run_blocks(images, set(take), end)
        if normalize_intermediates:
            states = [self.ln_post(s) for s in states]
        out: dict = {"image_intermediates": states}
        if not intermediates_only:
            out["image_features"] = self.head(self.branch_tokens(x))
        return out

    def hidden_states(
        self,
        images: torch.Tensor,
        layers: Sequence[int],
        branch: int | None = None,
        all_class_tokens: bool = False,
    ) -> list[torch.Tensor]:
        """A branch's token sequence (B, T, W) at each of ``layers``, from one pass of
        :meth:`forward_intermediates` (see ``HolisticCLIP.encode_image_tokens`` for the layout).

        ``layers`` index the L + 1 hidden states as Hugging Face's ``hidden_states`` do: 0 is the
        embeddings (the first block's input, after ``ln_pre``), k >= 1 the output of block k - 1,
        negative k counts from the end.
        """
        blocks = len(self.transformer.resblocks)
        layers = list(layers)
        if not layers:
            raise ValueError("no layer requested")
        for k in layers:
            if isinstance(k, bool) or not isinstance(k, int) or not -(blocks + 1) <= k <= blocks:
                raise ValueError(
                    f"layer {k!r} is not a layer of the image tower: it has {blocks} blocks, so layers "
                    f"{-(blocks + 1)}..{blocks} (0: the embeddings, k >= 1: the k-th block's output, -1: the last's)"
                )
        if branch is not None and not 0 <= branch < self.num_branches:
            raise ValueError(f"branch index {branch} out of range for {self.num_branches} branches")
        resolved = [k % (blocks + 1) for k in layers]
        if branch is None and self.num_branches > 1 and max(resolved) > self.fork_at:
            raise ValueError(
                f"Psi_MLP's branches have their own token streams from layer {self.fork_at + 1} on (the "
                f"first forked block's output), so layer {layers[resolved.index(max(resolved))]} needs a named branch"
            )
        states = {}
        take = sorted({k - 1 for k in resolved if k > 0})
        if take:
            out = self.forward_intermediates(images, indices=take, stop_early=True, intermediates_only=True)
            states = {i + 1: s for i, s in zip(take, out["image_intermediates"])}
        if 0 in resolved:
            states[0] = self.embed(images)
        return [self._branch_sequence(states[k], branch, all_class_tokens) for k in resolved]

    def _branch_sequence(self, state: torch.Tensor, branch: int | None, all_class_tokens: bool) -> torch.Tensor:
        """Class tokens (one per branch, or the branch's own) then the branch's patch tokens."""
        if state.dim() == 4:  # Psi_MLP after the fork: each branch's class token from its own stream
            cls = state[:, :, 0].transpose(0, 1)
            patches = state[0 if branch is None else branch, :, 1:]
        else:  # before the fork every branch reads Psi_MLP's one class token: repeated, so T is the same at every layer
            prefix = self.num_prefix_tokens
            cls = state[:, :prefix].expand(-1, self.num_branches, -1)
            patches = state[:, prefix:]
        if branch is not None and not all_class_tokens:
            cls = cls[:, branch: branch + 1]
        return torch.cat([cls, patches], dim=1)

    def branch_tokens(self, states: torch.Tensor) -> torch.Tensor:
        """Class-token state per branch, (B, H, W), from a state of :meth:`forward_intermediates`."""
        if states.dim() == 4:  # mlp: one class token per stream
            return states[:, :, 0].transpose(0, 1)
        return states[:, : self.num_branches]

    def head(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.ln_post(tokens) @ self.proj

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Un-normalised branch embeddings (B, H, D)."""
        x, _ = self._run_blocks(images)
        return self.head(self.branch_tokens(x))

    # -- read-outs for evaluation ----------------------------------------------------------
    def _last_block_inputs(self, images: torch.Tensor) -> torch.Tensor:
        """Inputs of the last block as (H', B, T, W); H' = 1 when streams are shared."""
        if len(self.transformer.resblocks) == 1:  # the embeddings themselves
            x = self.embed(images)
        else:
            out = self.forward_intermediates(images, indices=[-2], stop_early=True, intermediates_only=True)
            x = out["image_intermediates"][0]
        return x if x.dim() == 4 else x.unsqueeze(0)

    def dense(self, images: torch.Tensor) -> torch.Tensor:
        """MaskCLIP-style patch embeddings per branch, (B, H, gh, gw, D), un-normalised.

        The last block's value path alone (no query-key mixing, no residual, no MLP), then the
        shared ln_post and proj: each patch keeps its own content in the joint space.
        """
        x = self._last_block_inputs(images)
        blk = self.transformer.resblocks[-1]
        attn = blk.attn
        width = x.shape[-1]
        w_v = attn.in_proj_weight[2 * width:]
        b_v = attn.in_proj_bias[2 * width:] if attn.in_proj_bias is not None else None
        v = F.linear(blk.ln_1(x[:, :, self.num_prefix_tokens:]), w_v, b_v)
        out = self.head(attn.out_proj(v))  # (H', B, P, D)
        out = out.transpose(0, 1).expand(-1, self.num_branches, -1, -1)
        return out.reshape(*out.shape[:2], *self.grid_size, out.shape[-1])

    def attention_maps(self, images: torch.Tensor) -> torch.Tensor:
        """Class-token-to-patch attention of the last block, heads averaged: (B, H, gh, gw)."""
        x = self._last_block_inputs(images)
        blk = self.transformer.resblocks[-1]
        q = blk.ln_1(x.flatten(0, 1))
        mask = self.attn_mask(q.shape[1], q)
        _, weights = blk.attn(q, q, q, need_weights=True, average_attn_weights=True, attn_mask=mask)
        weights = weights.view(x.shape[0], x.shape[1], *weights.shape[1:])  # (H', B, T, T)
        if self.encoder == "cls":
            maps = weights[0, :, : self.num_branches, self.num_prefix_tokens:]
        else:
            maps = weights[:, :, 0, self.num_prefix_tokens:].transpose(0, 1).expand(-1, self.num_branches, -1)
        return maps.reshape(*maps.shape[:2], *self.grid_size)

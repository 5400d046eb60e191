"""SAM's mask decoder: output tokens + prompt tokens run through the two-way transformer against the image
embedding; each mask token becomes (through a small hypernetwork MLP) the weights of a dot product with the
upscaled image features, and the IoU token predicts each mask's quality."""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor, nn

from lib.models.sam.common import MLP, LayerNorm2d


class MaskDecoder(nn.Module):
    def __init__(self, *, transformer_dim: int, transformer: nn.Module, num_multimask_outputs: int = 3,
                 activation: type[nn.Module] = nn.GELU, iou_head_depth: int = 3,
                 iou_head_hidden_dim: int = 256) -> None:
        """
        transformer_dim: token / image-embedding width.
        transformer: the two-way transformer, called as transformer(image, image_pe, tokens).
        num_multimask_outputs: masks predicted for ambiguous prompts (plus one single-mask output).
        activation: activation of the upscaling convolutions.
        iou_head_depth, iou_head_hidden_dim: the IoU prediction MLP.
        """
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            activation(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(self, image_embeddings: Tensor, image_pe: Tensor, sparse_prompt_embeddings: Tensor,
                dense_prompt_embeddings: Tensor, multimask_output: bool) -> Tuple[Tensor, Tensor]:
        """Mask logits (B, M, 4h, 4w) and predicted IoUs (B, M): M = num_multimask_outputs masks when
        multimask_output, else the single-mask output alone."""
        masks, iou_pred = self.predict_masks(image_embeddings, image_pe, sparse_prompt_embeddings,
                                             dense_prompt_embeddings)
        keep = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, keep], iou_pred[:, keep]

    # -- the steps of predict_masks, separate so that a subclass can add tokens or heads --------------------
    def output_tokens(self, batch: int) -> Tensor:
        """The learned output tokens put before the prompt tokens: (batch, 1 + num_mask_tokens, C)."""
        tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        return tokens.unsqueeze(0).expand(batch, -1, -1)

    def image_source(self, image_embeddings: Tensor, dense_prompt_embeddings: Tensor, batch: int) -> Tensor:
        """Image embedding plus the dense prompt, one per prompt set (an embedding batch of 1 is shared), as a
        (batch, C, h, w) tensor in channels-last memory: the transformer's token view of it is then free."""
        if image_embeddings.shape[0] not in (1, batch):
            raise ValueError(f"{image_embeddings.shape[0]} image embeddings for {batch} prompt sets")
        if torch.is_grad_enabled() and (image_embeddings.requires_grad or dense_prompt_embeddings.requires_grad):
            src = image_embeddings + dense_prompt_embeddings  # out= below does not support autograd
            return src.expand(batch, -1, -1, -1).contiguous(memory_format=torch.channels_last)
        if image_embeddings.shape[0] == 1 and (dense_prompt_embeddings.shape[0] == 1
                                               or dense_prompt_embeddings.stride(0) == 0):
            # One image and no mask prompts (the dense embedding is one constant, expanded): a single source
            # serves every prompt; the transformer broadcasts it until the prompts make the tokens differ.
            batch = 1
            dense_prompt_embeddings = dense_prompt_embeddings[:1]
        src = torch.empty((batch, *image_embeddings.shape[1:]), dtype=image_embeddings.dtype,
                          device=image_embeddings.device, memory_format=torch.channels_last)
        return torch.add(image_embeddings, dense_prompt_embeddings, out=src)

    def heads(self, tokens_out: Tensor, image_tokens: Tensor, spatial: Tuple[int, int]) -> Tuple[Tensor, Tensor]:
        """Transformer outputs -> all mask logits (B, num_mask_tokens, 4h, 4w) and IoUs (B, num_mask_tokens).
        tokens_out (B, N, C) starts with the IoU token then the mask tokens; image_tokens is (B, h*w, C)."""
        b, _, c = image_tokens.shape
        h, w = spatial
        iou_token_out = tokens_out[:, 0]
        mask_tokens_out = tokens_out[:, 1:1 + self.num_mask_tokens]
        # NCHW view of the tokens (channels-last memory, no copy); the upscaling convolutions keep that layout.
        features = self.output_upscaling(image_tokens.reshape(b, h, w, c).permute(0, 3, 1, 2))
        weights = torch.stack([mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)],
                              dim=1)  # (B, num_mask_tokens, C / 8)
        pixels = features.permute(0, 2, 3, 1).reshape(b, -1, features.shape[1])  # (B, 16hw, C / 8)
        masks = (weights @ pixels.transpose(1, 2)).unflatten(2, features.shape[-2:])
        return masks, self.iou_prediction_head(iou_token_out)

    def predict_masks(self, image_embeddings: Tensor, image_pe: Tensor, sparse_prompt_embeddings: Tensor,
                      dense_prompt_embeddings: Tensor) -> Tuple[Tensor, Tensor]:
        batch = sparse_prompt_embeddings.shape[0]
        tokens = torch.cat([self.output_tokens(batch), sparse_prompt_embeddings], dim=1)
        src = self.image_source(image_embeddings, dense_prompt_embeddings, batch)
        tokens_out, image_tokens = self.transformer(src, image_pe, tokens)
        return self.heads(tokens_out, image_tokens, src.shape[-2:])

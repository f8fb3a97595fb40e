"""Resolution steps of a fine-tuning run: the 1st place raised its input size in steps
(224 -> 280 -> 290), so the tower learns the finer detail late, at a fraction of the cost of
training at the largest size throughout.

`finetune.image_sizes` gives each epoch's input size. A step changes three things together:
the Preprocess the images get (the variant's own, at the new size), a ViT's grid of learned
position embeddings (interpolated as open_clip interpolates it when it loads a checkpoint at
another size: `open_clip.model.resize_pos_embed`, bicubic, antialiased), and the variant's
config (`vision_cfg.image_size`, `preprocess_cfg.size`), so that extract, export and
`local-dir:` load the run at the size it finished at. A tower whose input size is free (a
convolutional timm trunk with average pooling) needs only the new preprocessing; towers with
position embeddings open_clip cannot resize (ModifiedResNet's attention pool, a timm ViT),
and ViT sizes that are not a multiple of the patch size, are refused before training starts.
Under `last_blocks` the stem is frozen: the interpolated embeddings are used as they are.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from open_clip.model import resize_pos_embed
from open_clip.transformer import VisionTransformer
from torch import nn



def check_resizable(visual: nn.Module, vision_cfg: dict[str, Any], sizes: list[int]) -> None:
    """Raise ValueError unless the tower can take each of `sizes`: an open_clip ViT with
    learned position embeddings on a square grid, at multiples of its patch size (the patch
    convolution would drop the pixels past the last whole patch: at patch 14, 290 px is the
    grid of 280 plus 10 px never seen), or a tower with no position embeddings (`vision_cfg`:
    the variant config's, which says how the embeddings were made)."""
    if isinstance(visual, VisionTransformer):
        if vision_cfg.get("pos_embed_type", "learnable") != "learnable":
            raise ValueError("finetune.image_sizes: this ViT's position embeddings are "
                             f"{vision_cfg['pos_embed_type']}, not learned; open_clip resizes "
                             "only learned ones")
        if visual.grid_size[0] != visual.grid_size[1]:
            raise ValueError(f"finetune.image_sizes: a non-square grid {visual.grid_size}")
        patch = visual.patch_size[0]
        for size in sizes:
            if size % patch:
                below, above = size // patch * patch, (size // patch + 1) * patch
                raise ValueError(f"finetune.image_sizes: {size} is not a multiple of the "
                                 f"patch size {patch}, so its last {size - below} px would "
                                 f"never be seen; use {below} or {above}")
        return
    named = [n for n, _ in (*visual.named_parameters(), *visual.named_buffers())
             if "pos" in n.split(".")[-1]]
    if named:
        raise ValueError(f"finetune.image_sizes: the tower ({type(visual).__name__}) has "
                         f"position embeddings open_clip cannot resize ({named[0]}); "
                         "resolution steps need an open_clip ViT or a convolutional tower")


def set_image_size(model: nn.Module, size: int,
                   optimizer: torch.optim.Optimizer | None = None) -> None:
    """Make `model`'s tower take `size` x `size` inputs, in place: its preprocess_cfg (what
    `Preprocess.from_cfg` reads) says `size`, and a ViT's position
    embeddings are interpolated to the new grid (on the CPU in float32, so the result is the
    same bytes on any device), and their optimizer moments (shaped for the old grid) restart,
    as for a new parameter; every other parameter keeps its own."""
    visual = model.visual
    visual.preprocess_cfg = {**visual.preprocess_cfg, "size": size}
    if not isinstance(visual, VisionTransformer):
        return
    visual.image_size = (size, size)
    visual.grid_size = (size // visual.patch_size[0], size // visual.patch_size[1])
    embedding = visual.positional_embedding
    state = {"visual.positional_embedding": embedding.detach().float().cpu()}
    resize_pos_embed(state, model)
    resized = state["visual.positional_embedding"]
    if resized.shape != embedding.shape:
        embedding.data = resized.to(embedding.device, embedding.dtype).contiguous()
        embedding.grad = None  # shaped for the old grid
        if optimizer is not None:
            optimizer.state.pop(embedding, None)


def config_at(config: dict[str, Any], size: int) -> dict[str, Any]:
    """An open_clip config whose tower and preprocessing take `size`: a run's variant config."""
    config = copy.deepcopy(config)
    config["model_cfg"]["vision_cfg"]["image_size"] = size
    config["preprocess_cfg"]["size"] = size
    return config

"""FSDP2 (`torch.distributed.fsdp.fully_shard`) over Quill on CPU ranks (gloo), for tests/test_training.py.

Accelerate runs plain DDP on CPUs whatever the FSDP config says, so this drives FSDP2 directly, wrapped as
recipes/accelerate/fsdp.yaml wraps it: one unit per decoder block, the root holding the tied embedding and lm_head.
Usage: python -m torch.distributed.run --standalone --nproc_per_node 2 fsdp_tiny.py OUT_DIR
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).parent))
import train_tiny  # noqa: E402


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = train_tiny.model()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)  # root unit: embed_tokens and the tied lm_head shard together
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rows = train_tiny.dataset()
    losses = []
    for step in range(3):
        batch = rows[step * 4:(step + 1) * 4][rank * 2:(rank + 1) * 2]  # the global batch of 4, split over ranks
        ids = torch.stack([r["input_ids"] for r in batch])
        labels = torch.stack([r["labels"] for r in batch])
        targets = (labels[:, 1:] != -100).sum()
        dist.all_reduce(targets)  # Σ targets over ranks, as the training loop does
        loss = model(ids, labels=labels, num_items_in_batch=targets).loss
        (loss * world).backward()  # FSDP averages gradients over ranks
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item())
    state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in model.state_dict().items()}
    if rank == 0:
        torch.save({k: v.detach() for k, v in state.items()}, out / "fsdp-weights.pt")
        (out / "fsdp-losses.json").write_text(json.dumps(losses))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))

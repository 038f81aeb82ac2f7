"""Worker for tests/test_generation_sharded.py (run by torchrun, 2 CPU processes, gloo): PIPO generation with an
FSDP2-sharded model, each rank with its own prompt and budget, must equal the unsharded model's output."""

from __future__ import annotations

import faulthandler
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from conftest import EOS_ID, PAD_ID, tiny_pipo  # noqa: E402


def main(out_dir: str, family: str, timeout_s: float) -> None:
    faulthandler.dump_traceback_later(timeout_s, exit=True)  # a hang prints where each rank waits, then exits
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    model = tiny_pipo(family, seed=0)
    gen = torch.Generator().manual_seed(100 + rank)
    prompt = torch.randint(3, PAD_ID, (1, 3 + 4 * rank), generator=gen)  # different lengths per rank
    max_new = 4 if rank == 0 else 15  # rank 0 finishes long before rank 1 and must keep stepping
    kwargs = dict(max_new_tokens=max_new, do_sample=False, eos_token_id=EOS_ID, pipo_confidence_threshold=0.5,
                  return_dict_in_generate=True)
    with torch.no_grad():
        reference = model.generate(prompt, **kwargs)

    from torch.distributed.fsdp import fully_shard

    for layer in model.backbone.layers:
        fully_shard(layer)
    fully_shard(model.mtp.decoder_layer())
    fully_shard(model)
    gathers = {"n": 0}
    original = dist.all_gather_single

    def counted(*args, **kw):
        gathers["n"] += 1
        return original(*args, **kw)

    dist.all_gather_single = counted
    with torch.no_grad():
        sharded = model.generate(prompt, **kwargs)
    dist.all_gather_single = original
    result = {
        "rank": rank,
        "same_sequences": torch.equal(reference.sequences, sharded.sequences),
        "same_slots": torch.equal(reference.pipo_slot_ids, sharded.pipo_slot_ids),
        "same_stats": torch.equal(reference.decode_steps, sharded.decode_steps)
        and torch.equal(reference.committed_drafts, sharded.committed_drafts),
        "new_tokens": int(sharded.sequences.shape[1] - prompt.shape[1]),
        "backbone_forwards": int(sharded.backbone_forwards),
        "all_gathers": gathers["n"],
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]))

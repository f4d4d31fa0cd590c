"""One process of the 2-process spatial-axis check (tests/train/test_spatial.py runs it through
scripts/launch_local.py, 2 processes x 2 CPU devices): batches of meshes whose spatial groups lie within a process or
span both, built from each process's clips, equal the global batch; writes `OK <mesh>` per mesh to
`$SPATIAL_HOSTS_OUT/p<process>.txt` (a file, not stdout: Gloo's C++ logging shares stdout and can split a line)."""
import os

import jax
import jax.numpy as jnp
import numpy as np

from cvvae_jax import distributed
from cvvae_jax.train import sharding

GLOBAL = (4, 1, 8, 4, 3)  # B, T, H, W, C


def main():
  distributed.initialize()
  clips = np.arange(np.prod(GLOBAL), dtype=np.float32).reshape(GLOBAL)
  for mesh_cfg, want_groups in (({"data": 1, "fsdp": 1, "spatial": 4}, 1),   # one clip over both processes
                                ({"data": 2, "fsdp": 1, "spatial": 2}, 2)):  # a spatial group in each process
    mesh = sharding.make_mesh(mesh_cfg)
    group, groups = sharding.data_groups(mesh)
    assert groups == want_groups, (mesh_cfg, group, groups)
    local_b = sharding.check_batch_divisible(GLOBAL[0], mesh, "batch_size")
    # What the data pipeline gives this process: its group's block of the global batch.
    local = clips[group * local_b:(group + 1) * local_b]
    x = sharding.shard_host_batch({"video": local}, mesh)["video"]
    assert x.shape == GLOBAL and x.sharding.spec == sharding.batch_spec(5), (x.shape, x.sharding)
    for shard in x.addressable_shards:
      assert shard.data.shape == (GLOBAL[0] // (mesh_cfg["data"] * mesh_cfg["fsdp"]), 1, GLOBAL[2] //
                                  mesh_cfg["spatial"], *GLOBAL[3:]), shard.data.shape
    # Every process sees the same global batch: the groups' blocks, in group order.
    rows = jax.jit(lambda v: jnp.sum(v, axis=(1, 2, 3, 4)), out_shardings=jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec()))(x)
    np.testing.assert_allclose(np.asarray(rows), clips.sum(axis=(1, 2, 3, 4)), rtol=1e-6)
    with open(os.path.join(os.environ["SPATIAL_HOSTS_OUT"], f"p{jax.process_index()}.txt"), "a") as f:
      f.write(f"OK {mesh_cfg}\n")


if __name__ == "__main__":
  main()

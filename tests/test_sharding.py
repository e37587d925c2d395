"""SPMD: a 4x2 ('data', 'model') mesh over 8 host devices gives a single device's losses."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

_SCRIPT = textwrap.dedent(r"""
    import json, sys
    import jax, numpy as np, optax
    sys.path.insert(0, {tests!r})
    from toy import ReverseCopyDataset
    from topk_transformers import gin_utils, partitioning, train

    assert jax.device_count() == 8, jax.devices()
    gin_utils.configure(['t5/t5_1_0/tiny.gin', 't5/topk.gin'],
                        ['NUM_EMBEDDINGS = 128', 'TOP_K = 32', 'DROPOUT_RATE = 0.0'])
    model = gin_utils.get_macro('MODEL')

    def run(partitioner, model_dir):
      result = train.train(model=model, dataset=ReverseCopyDataset(), model_dir=model_dir, train_steps=4,
                           batch_size=8, optimizer=optax.adafactor, learning_rate=train.rsqrt_schedule(1.0, 100),
                           partitioner=partitioner, eval_period=0, log_period=1, checkpoint_period=0)
      return result

    single = run(partitioning.Partitioner(devices=jax.devices()[:1]), sys.argv[1] + '/single')
    sharded = run(partitioning.Partitioner(num_partitions=2), sys.argv[1] + '/sharded')
    wi = sharded.state.params['encoder']['layers_0']['mlp']['wi']['kernel']
    emb = sharded.state.params['token_embedder']['embedding']
    out = dict(
        single_loss=single.train_metrics['loss'], sharded_loss=sharded.train_metrics['loss'],
        mesh=dict(sharded_mesh=dict(zip(wi.sharding.mesh.axis_names, wi.sharding.mesh.devices.shape))),
        wi_spec=[str(a) for a in wi.sharding.spec], wi_shape=list(wi.shape),
        wi_shard_shape=list(wi.addressable_shards[0].data.shape), wi_num_devices=len(wi.sharding.device_set),
        emb_spec=[str(a) for a in emb.sharding.spec],
        max_param_diff=max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                           for a, b in zip(jax.tree_util.tree_leaves(single.state.params),
                                           jax.tree_util.tree_leaves(sharded.state.params))),
    )
    print('RESULT ' + json.dumps(out))
""")


@pytest.mark.slow
def test_4x2_mesh_matches_single_device_and_shards_params(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  script = _SCRIPT.format(tests=os.path.join(root, "tests"))
  proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=root, env=env, capture_output=True,
                        text=True, timeout=900)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, proc.stderr[-3000:]
  r = json.loads(lines[-1][len("RESULT "):])
  assert r["mesh"]["sharded_mesh"] == {"data": 4, "model": 2}
  # The MLP's hidden axis is model-parallel: each device holds half of wi's columns.
  assert r["wi_spec"] == ["None", "model"]
  assert r["wi_shard_shape"] == [r["wi_shape"][0], r["wi_shape"][1] // 2]
  assert r["wi_num_devices"] == 8
  assert r["emb_spec"] == ["model", "None"]  # vocab axis model-parallel
  assert abs(r["single_loss"] - r["sharded_loss"]) <= 1e-4 * abs(r["single_loss"])
  assert r["max_param_diff"] < 1e-4

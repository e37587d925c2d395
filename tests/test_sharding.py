"""SPMD on 8 host devices, in one subprocess that both tests share (its start-up and imports are paid once):

- a 4x2 ('data', 'model') mesh gives a single device's losses and shards the parameters as T5X does;
- ``PARAMETER_SHARDING='2d'`` also shards parameters' ``embed`` axis over ``data`` (the README's claim for
  3B/11B), with the same logits as one device.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = textwrap.dedent(r"""
    import json, sys
    import flax.linen as nn, jax, jax.numpy as jnp, numpy as np, optax
    sys.path.insert(0, {tests!r})
    from conftest import tiny_t5_config
    from toy import ReverseCopyDataset
    from topk_transformers import gin_utils, partitioning, train
    from topk_transformers.t5 import network

    assert jax.device_count() == 8, jax.devices()

    # PARAMETER_SHARDING: '1d' and '2d' against one device, on a forward pass.
    net = network.Transformer(tiny_t5_config(top_k=4))
    tokens = jnp.asarray(np.random.default_rng(0).integers(2, 64, (8, 6)), jnp.int32)
    boxed = net.init(jax.random.PRNGKey(0), tokens, tokens, tokens, enable_dropout=False)["params"]
    forward = lambda p, t: net.apply({{"params": p}}, t, t, t, enable_dropout=False)
    sharding_2d = {{}}
    for mode in ("1d", "2d"):
      part = partitioning.Partitioner(num_partitions=2, parameter_sharding=mode)
      params = jax.device_put(nn.meta.unbox(boxed), part.logical_shardings(boxed))
      wi = params["encoder"]["layers_0"]["mlp"]["wi"]["kernel"]
      emb = params["token_embedder"]["embedding"]
      logits = jax.jit(forward)(params, jax.device_put(tokens, part.data_sharding(2)))
      sharding_2d[mode] = dict(wi_spec=[str(a) for a in wi.sharding.spec],
                               wi_shard=list(wi.addressable_shards[0].data.shape),
                               emb_spec=[str(a) for a in emb.sharding.spec], logits=np.asarray(logits).tolist())
    sharding_2d["single"] = np.asarray(jax.jit(forward)(nn.meta.unbox(boxed), tokens)).tolist()

    # Training on a 4x2 mesh against one device.
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
    mesh_4x2 = dict(
        single_loss=single.train_metrics['loss'], sharded_loss=sharded.train_metrics['loss'],
        mesh=dict(sharded_mesh=dict(zip(wi.sharding.mesh.axis_names, wi.sharding.mesh.devices.shape))),
        wi_spec=[str(a) for a in wi.sharding.spec], wi_shape=list(wi.shape),
        wi_shard_shape=list(wi.addressable_shards[0].data.shape), wi_num_devices=len(wi.sharding.device_set),
        emb_spec=[str(a) for a in emb.sharding.spec],
        max_param_diff=max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                           for a, b in zip(jax.tree_util.tree_leaves(single.state.params),
                                           jax.tree_util.tree_leaves(sharded.state.params))),
    )
    print('RESULT ' + json.dumps(dict(mesh_4x2=mesh_4x2, sharding_2d=sharding_2d)))
""")


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
  """The script's results, or the subprocess's failure (re-raised in each test that asks)."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  script = _SCRIPT.format(tests=os.path.join(ROOT, "tests"))
  proc = subprocess.run([sys.executable, "-c", script, str(tmp_path_factory.mktemp("eight_devices"))], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=900)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, proc.stderr[-3000:]
  return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.slow
def test_4x2_mesh_matches_single_device_and_shards_params(eight_devices):
  r = eight_devices["mesh_4x2"]
  assert r["mesh"]["sharded_mesh"] == {"data": 4, "model": 2}
  # The MLP's hidden axis is model-parallel: each device holds half of wi's columns.
  assert r["wi_spec"] == ["None", "model"]
  assert r["wi_shard_shape"] == [r["wi_shape"][0], r["wi_shape"][1] // 2]
  assert r["wi_num_devices"] == 8
  assert r["emb_spec"] == ["model", "None"]  # vocab axis model-parallel
  assert abs(r["single_loss"] - r["sharded_loss"]) <= 1e-4 * abs(r["single_loss"])
  assert r["max_param_diff"] < 1e-4


@pytest.mark.slow
def test_parameter_sharding_2d_shards_the_embed_axis_over_data_on_8_devices(eight_devices):
  r = eight_devices["sharding_2d"]
  assert r["1d"]["wi_spec"] == ["None", "model"] and r["1d"]["wi_shard"] == [16, 16]
  assert r["2d"]["wi_spec"] == ["data", "model"] and r["2d"]["wi_shard"] == [4, 16]  # embed 16 over data 4
  assert r["1d"]["emb_spec"] == ["model", "None"] and r["2d"]["emb_spec"] == ["model", "data"]
  for mode in ("1d", "2d"):
    np.testing.assert_allclose(r[mode]["logits"], r["single"], rtol=1e-5, atol=1e-5)

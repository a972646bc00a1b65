"""Random model variables without compiling `module.init`.

Compiling a backbone's init on a CPU takes 10+ s (one threefry RNG program
per parameter); tests only need some variables of the right shapes, so they
draw them with numpy from the abstract (eval_shape) init.
"""

import jax
import jax.numpy as jnp
import numpy as np


def random_variables(module, input_shape, seed=0):
    """Returns {'params', 'batch_stats'} for `module` with random values.

    Kernels are He-scaled normals, BatchNorm variances positive, so deep
    stacks stay finite; GeM's exponent p is 3, its init (a draw around 0
    would make the pooled features NaN).
    """
    rng = np.random.default_rng(seed)
    abstract = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros(input_shape, jnp.float32))

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            value = rng.normal(0.0, np.sqrt(2.0 / fan_in), leaf.shape)
        elif name == "p":
            value = np.full(leaf.shape, 3.0)
        elif name in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, leaf.shape)
        else:  # bias, mean
            value = rng.normal(0.0, 0.1, leaf.shape)
        return value.astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract)

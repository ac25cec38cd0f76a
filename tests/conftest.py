"""Every test process sees 8 simulated CPU devices, so sharding is tested without hardware.

Compiled programs are cached on disk for the session (and the subprocesses it
starts, through the environment): many tests compile the same small steps,
and the end-of-run evaluation compiles the same encode/decode, again and
again. A hit returns the very executable a compile would, so results are
unchanged.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="saejax-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

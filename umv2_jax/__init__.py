# Before any JAX backend starts: a CPU-only Linux host runs JAX on its CPU backend alone, so that
# installed accelerator plugins (libtpu, CUDA) print no initialisation errors (umv2_jax/backends.py).
from umv2_jax.backends import pin_cpu_without_accelerators as _pin_cpu_without_accelerators

_pin_cpu_without_accelerators()

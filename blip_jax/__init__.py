"""BLIP, BLIP-2 and InstructBLIP in JAX/Flax."""

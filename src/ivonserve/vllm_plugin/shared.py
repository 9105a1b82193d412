"""What the plugin's modules share: its one exception and the LoRA kernel variable (a leaf
module: the patches import it, the package's entry point imports the patches)."""

SUPPORTED_VLLM = ("0.32.0", "0.33.0")
LORA_KERNEL_ENV = "IVONSERVE_LORA_KERNEL"  # grouped | vllm; the engine sets it for its workers
LORA_KERNELS = ("grouped", "vllm")


class PluginError(RuntimeError):
    """vLLM is not a version (or its code not the shape) this plugin was written against.
    ``ivonserve.errors`` re-exports it (the plugin itself imports nothing of ivonserve)."""

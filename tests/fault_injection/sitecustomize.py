"""Python imports this at start-up when this directory is on PYTHONPATH (the DDP kill test's torchrun workers)."""
import fault_injection

fault_injection.install()

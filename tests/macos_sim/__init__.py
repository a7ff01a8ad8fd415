"""The simulated-macOS test mode: see darwin.py and tests/test_macos_sim.py."""

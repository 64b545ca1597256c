"""Shared test setup: every test starts from the same random state, so failures reproduce."""
import pytest
import torch


@pytest.fixture(autouse=True)
def seed_torch():
    torch.manual_seed(0)
    yield

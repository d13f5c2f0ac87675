import pytest

from detrax.config import presets, schema
from detrax.config.overrides import override


def test_num_classes_is_auto_or_a_number():
    """auto follows the training data (test_train); a number given as text becomes a number; a model is built
    from a number only."""
    from flax import nnx

    from detrax.models.detr import DETR

    assert override(presets.get("demo"), ["model.num_classes=24"]).model.num_classes == 24
    assert override(presets.get("tiny"), ["model.num_classes=auto"]).model.num_classes == "auto"
    with pytest.raises(ValueError, match="num_classes must be a number or auto, not 'many'"):
        override(presets.get("demo"), ["model.num_classes=many"])
    with pytest.raises(ValueError, match="num_classes must be at least 1"):
        override(presets.get("demo"), ["model.num_classes=0"])
    with pytest.raises(ValueError, match="a training run sets it from its data"):
        DETR(presets.get("demo").model, rngs=nnx.Rngs(0))
    assert schema.from_dict(schema.to_dict(presets.get("demo"))) == presets.get("demo")


def test_presets():
    assert presets.get("detr_r50").model.depths == (3, 4, 6, 3)
    assert presets.get("detr_r101").model.depths == (3, 4, 23, 3)
    assert presets.get("detr_r50_dc5").model.dilation and presets.get("detr_r101_dc5").model.dilation
    assert not presets.get("detr_r50").model.dilation
    m = presets.get("detr_r50").model
    assert (m.num_queries, m.hidden_dim, m.num_heads, m.enc_layers, m.dec_layers, m.ffn_dim, m.dropout,
            m.num_classes, m.pre_norm) == (100, 256, 8, 6, 6, 2048, 0.1, "auto", False)
    assert m.backbone_channels == 2048
    assert presets.get("detr_r50", smoke=True).model.hidden_dim < 256


def test_override_and_its_errors():
    cfg = override(presets.get("tiny"), ["model.num_classes=20", "model.pre_norm=true",
                                                 "model.depths=1,2,1,1"])
    assert cfg.model.num_classes == 20 and cfg.model.pre_norm and cfg.model.depths == (1, 2, 1, 1)
    with pytest.raises(ValueError, match="unknown config key 'model.num_clases'.*num_classes"):
        override(cfg, ["model.num_clases=3"])
    with pytest.raises(ValueError, match="bad value for 'model.pre_norm'"):
        override(cfg, ["model.pre_norm=maybe"])
    with pytest.raises(ValueError, match="not key=value"):
        override(cfg, ["model.num_classes"])
    with pytest.raises(ValueError, match="unknown config 'detr_r5'"):
        presets.get("detr_r5")


def test_invalid_model_configs():
    with pytest.raises(ValueError, match="not divisible"):
        schema.ModelConfig(hidden_dim=250)
    with pytest.raises(ValueError, match="use backbone='resnet'"):
        schema.ModelConfig(backbone="resnet50", depths=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="attention must be"):
        schema.ModelConfig(attention="flash")


def test_model_config_json_round_trip():
    cfg = presets.get("detr_r101_dc5").model
    import json

    assert schema.model_config_from_dict(json.loads(schema.model_config_to_json(cfg))) == cfg
    with pytest.raises(ValueError, match="unknown model config keys"):
        schema.model_config_from_dict({"bogus": 1})


def test_length_shortcuts():
    cfg = override(presets.get("demo"), ["steps=7", "epochs=3", "batch_size=4"])
    assert (cfg.train.steps, cfg.train.epochs, cfg.train.batch_size) == (7, 3, 4)


def test_config_dict_round_trip():
    cfg = presets.get("detr_r50_dc5")
    assert schema.from_dict(schema.to_dict(cfg)) == cfg

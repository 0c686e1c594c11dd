"""Feature columns: per-type preprocessing state, Keras layers and served input specs.

``columns`` holds one class per feature type (the one place a type is defined); ``encoder``
puts one side's columns together as the tower's input layer; ``sources`` maps a served
model's inputs (the source columns of derived features) to the tower's.
"""

from tfrs_coldstart.features.columns import (
    COLUMN_TYPES,
    ID_FEATURE,
    CategoricalColumn,
    DenseVectorColumn,
    FeatureColumn,
    IdColumn,
    IdsOfColumn,
    MultiHotColumn,
    NumericColumn,
    TextColumn,
    build_columns,
    column_from_dict,
    columns_from_state,
    columns_to_state,
    input_array,
    spec_for_input,
)
from tfrs_coldstart.features.encoder import FeatureEncoder, build_state, dummy_inputs
from tfrs_coldstart.features.sources import SourceInputError, SourceInputs, served_arrays

__all__ = [
    "COLUMN_TYPES",
    "ID_FEATURE",
    "CategoricalColumn",
    "DenseVectorColumn",
    "FeatureColumn",
    "FeatureEncoder",
    "IdColumn",
    "IdsOfColumn",
    "MultiHotColumn",
    "NumericColumn",
    "SourceInputError",
    "SourceInputs",
    "TextColumn",
    "build_columns",
    "build_state",
    "column_from_dict",
    "columns_from_state",
    "columns_to_state",
    "dummy_inputs",
    "input_array",
    "served_arrays",
    "spec_for_input",
]

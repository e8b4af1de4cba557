"""Beam transforms of beam-influence: projection, index, top-k, outputs, options."""
from beam_influence.beam.index import (IndexRecords, ReadIndex, WriteIndex, check_index, list_shards, read_manifest,
                                       write_manifest)
from beam_influence.beam.options import InfluenceOptions, model_ref, preflight
from beam_influence.beam.outputs import SELF_SCHEMA, TOPK_SCHEMA, WriteDeadLetters, WriteSortedRows, read_jsonl
from beam_influence.beam.project import DEAD_LETTER, ProjectGradients
from beam_influence.beam.resources import InfluenceContext, ModelRef
from beam_influence.beam.topk import BundleTopK, TopKCombineFn, TopKInfluence, TopSelfInfluence
from beam_influence.io import ReadExamples

__all__ = [
    "BundleTopK", "DEAD_LETTER", "IndexRecords", "InfluenceContext", "InfluenceOptions", "ModelRef", "ProjectGradients",
    "ReadExamples", "ReadIndex", "SELF_SCHEMA", "TOPK_SCHEMA", "TopKCombineFn", "TopKInfluence",
    "TopSelfInfluence", "WriteDeadLetters", "WriteIndex", "WriteSortedRows", "check_index", "list_shards",
    "model_ref", "preflight", "read_jsonl", "read_manifest", "write_manifest",
]

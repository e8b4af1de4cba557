"""Beam transforms of beam-influence: reading chunks, projection (RunInference), index, top-k, outputs."""
from beam_influence.beam import complement_term
from beam_influence.beam.complement_term import ComplementTerm
from beam_influence.beam.index import (IndexChunks, IndexCorruptError, IndexRecords, check_index, collect,
                                       index_arrays, new_data_dir, publish, read_index_table, read_manifest,
                                       read_shard, shard_refs)
from beam_influence.beam.preflight import model_ref, preflight
from beam_influence.beam.outputs import (SELF_SCHEMA, TOPK_SCHEMA, WriteDeadLetters, WriteJsonLines, WriteResult,
                                         read_jsonl, write_rows)
from beam_influence.beam.project import (DEAD_LETTER, ProjectChunks, ProjectedChunk, ProjectionModelHandler,
                                         projection_matrix, projections)
from beam_influence.beam.read import ReadChunks
from beam_influence.beam.resources import InfluenceContext, ModelRef
from beam_influence.beam.ranking import QuerySet, TopKCombineFn, TopKInfluence, TopSelfInfluence, self_rows, topk_rows

__all__ = [
    "ComplementTerm", "DEAD_LETTER", "IndexChunks", "IndexCorruptError", "IndexRecords", "InfluenceContext",
    "ModelRef", "ProjectChunks", "ProjectedChunk", "ProjectionModelHandler", "QuerySet", "ReadChunks", "SELF_SCHEMA",
    "TOPK_SCHEMA", "TopKCombineFn", "TopKInfluence", "TopSelfInfluence", "WriteDeadLetters", "WriteJsonLines",
    "WriteResult", "check_index", "collect", "index_arrays", "model_ref", "new_data_dir", "preflight",
    "projection_matrix", "projections", "publish", "read_index_table", "read_jsonl", "read_manifest", "read_shard",
    "self_rows", "shard_refs", "topk_rows", "write_rows",
]

"""Reading and writing files: ONNX models (external data, untrusted paths,
atomic all-or-nothing outputs) and calibration sets."""

from ..lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "calibration": [
        "CalibrationSet", "InputSpec", "MASK_NAMES", "attention_cache_dims", "check_calibration", "check_labels",
        "choose_calibration",
        "fixed_batch", "format_shape", "is_cache_input", "load_calibration", "load_npz", "model_inputs",
        "sidecar_path", "synthetic_calibration",
    ],
    "output_plan": ["OUTPUT_MODEL", "OutputPlan", "Written", "compress_plan", "default_output", "default_report",
                    "finetune_plan", "finetuned_output", "run_inputs", "torch_model_files"],
    "model_files": [
        "EXTERNAL_DATA_THRESHOLD", "atomic_paths", "beside", "check_name_length", "check_output_path", "checkable",
        "data_folder", "destination_name", "external_bytes", "external_data_folder", "external_locations",
        "external_tensors", "files_size", "graph_input_names", "initializer_bytes", "load_model", "load_model_files",
        "model_files_for", "proto_size", "refuse_inputs", "save_model", "saved_with_external_data", "tensor_array",
        "write_model_files",
    ],
})

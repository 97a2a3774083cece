//! `airgate model inspect`: load a model file with the engine that will serve
//! it (llama.cpp for GGUF, tract for ONNX) and describe it. The serving paths
//! (the LLM and ONNX issues) build on the same loaders.

use std::io::Read;
use std::path::Path;

use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: llama.cpp could not load it as a GGUF model: {reason}")]
    Gguf { path: String, reason: String },
    #[error(
        "{path}: not a GGUF file (no GGUF magic), and tract could not load it as ONNX: {reason}"
    )]
    Onnx { path: String, reason: String },
}

#[derive(Debug, Serialize)]
#[serde(tag = "format", rename_all = "lowercase")]
pub enum ModelInfo {
    Gguf(GgufInfo),
    Onnx(OnnxInfo),
}

#[derive(Debug, Serialize)]
pub struct GgufInfo {
    pub name: Option<String>,
    pub architecture: Option<String>,
    pub license: Option<String>,
    pub parameters: u64,
    pub size_bytes: u64,
    pub context_length: u32,
    pub embedding_length: i32,
    pub layers: u32,
    pub vocabulary: i32,
}

#[derive(Debug, Serialize)]
pub struct OnnxInfo {
    pub inputs: Vec<TensorInfo>,
    pub outputs: Vec<TensorInfo>,
    pub nodes: usize,
}

#[derive(Debug, Serialize)]
pub struct TensorInfo {
    pub name: String,
    pub datatype: String,
    pub shape: String,
}

/// Loads and describes a model file.
pub fn inspect(path: &Path) -> Result<ModelInfo, ModelError> {
    let shown = path.display().to_string();
    let mut magic = [0u8; 4];
    let mut file = std::fs::File::open(path).map_err(|source| ModelError::Read {
        path: shown.clone(),
        source,
    })?;
    let n = file.read(&mut magic).map_err(|source| ModelError::Read {
        path: shown.clone(),
        source,
    })?;
    if n == 4 && &magic == b"GGUF" {
        inspect_gguf(path).map_err(|reason| ModelError::Gguf {
            path: shown,
            reason,
        })
    } else {
        inspect_onnx(path).map_err(|reason| ModelError::Onnx {
            path: shown,
            reason,
        })
    }
}

fn inspect_gguf(path: &Path) -> Result<ModelInfo, String> {
    use llama_cpp_2::llama_backend::LlamaBackend;
    use llama_cpp_2::model::LlamaModel;
    use llama_cpp_2::model::params::LlamaModelParams;

    llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
    let backend = LlamaBackend::init().map_err(|e| e.to_string())?;
    let params = LlamaModelParams::default();
    let model = LlamaModel::load_from_file(&backend, path, &params).map_err(|e| e.to_string())?;
    let meta = |key: &str| model.meta_val_str(key).ok();
    Ok(ModelInfo::Gguf(GgufInfo {
        name: meta("general.name"),
        architecture: meta("general.architecture"),
        license: meta("general.license"),
        parameters: model.n_params(),
        size_bytes: model.size(),
        context_length: model.n_ctx_train(),
        embedding_length: model.n_embd(),
        layers: model.n_layer(),
        vocabulary: model.n_vocab(),
    }))
}

fn inspect_onnx(path: &Path) -> Result<ModelInfo, String> {
    use tract_onnx::prelude::Framework as _;
    // The names, datatypes and shapes the KServe endpoint will show.
    let nodes = tract_onnx::onnx()
        .model_for_path(path)
        .map_err(|e| format!("{e:#}"))?
        .nodes()
        .len();
    let model = crate::onnx::OnnxModel::load("inspect", path, 1, 0, 0, 1)?;
    let describe = |specs: &[crate::onnx::TensorSpec]| {
        specs
            .iter()
            .map(|s| TensorInfo {
                name: s.name.clone(),
                datatype: s.datatype.name().to_owned(),
                shape: s
                    .shape
                    .iter()
                    .map(|d| match d {
                        crate::onnx::Dim::Fixed(n) => n.to_string(),
                        crate::onnx::Dim::Symbol(s) => s.clone(),
                    })
                    .collect::<Vec<_>>()
                    .join(","),
            })
            .collect()
    };
    Ok(ModelInfo::Onnx(OnnxInfo {
        inputs: describe(&model.inputs),
        outputs: describe(&model.outputs),
        nodes,
    }))
}

impl std::fmt::Display for ModelInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Gguf(g) => {
                writeln!(f, "format:        GGUF (llama.cpp)")?;
                writeln!(f, "name:          {}", g.name.as_deref().unwrap_or("-"))?;
                writeln!(
                    f,
                    "architecture:  {}",
                    g.architecture.as_deref().unwrap_or("-")
                )?;
                writeln!(f, "license:       {}", g.license.as_deref().unwrap_or("-"))?;
                writeln!(f, "parameters:    {}", g.parameters)?;
                writeln!(f, "size:          {} bytes", g.size_bytes)?;
                writeln!(f, "context:       {}", g.context_length)?;
                writeln!(f, "embedding:     {}", g.embedding_length)?;
                writeln!(f, "layers:        {}", g.layers)?;
                write!(f, "vocabulary:    {}", g.vocabulary)
            }
            Self::Onnx(o) => {
                writeln!(f, "format:        ONNX (tract), {} nodes", o.nodes)?;
                for (dir, tensors) in [("input ", &o.inputs), ("output", &o.outputs)] {
                    for t in tensors {
                        writeln!(f, "{dir}  {}  {}  [{}]", t.name, t.datatype, t.shape)?;
                    }
                }
                Ok(())
            }
        }
    }
}

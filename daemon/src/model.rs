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

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// No configuration, no bundle in force.
    #[error("{0}")]
    Setup(String),
    /// Some files were not in the manifest (or did not match); the report says which.
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Io(String),
}

/// `airgate model import`: copies the files named by the manifest of the
/// bundle in force into models_dir. Each file is hashed while it is copied
/// (to a temporary name beside the destination), then fsynced, made
/// read-only to everyone but root (0644, or 0640 group airgate when that
/// group exists) and renamed into place under the manifest's name.
pub fn import(paths: &[std::path::PathBuf], config: &Path) -> Result<String, ImportError> {
    use std::fmt::Write as _;
    use std::os::unix::fs::PermissionsExt as _;
    let config =
        crate::config::Config::load(config).map_err(|e| ImportError::Setup(e.to_string()))?;
    let policy = crate::bundle::Policy::open(&config)
        .map_err(|e| ImportError::Setup(format!("cannot read the policy store: {e}")))?;
    let active = policy.active().ok_or_else(|| {
        ImportError::Setup(
            "no bundle is in force: import checks files against its manifest (drop a bundle in the inbox first)"
                .to_owned(),
        )
    })?;
    let bundle = &active.verified.bundle;
    // sha256 -> (file name, models that use it)
    let mut wanted: std::collections::BTreeMap<[u8; 32], (String, Vec<String>)> =
        Default::default();
    for m in bundle.models.values() {
        for f in &m.files {
            wanted
                .entry(f.sha256)
                .or_insert_with(|| (f.name.clone(), Vec::new()))
                .1
                .push(m.id.clone());
        }
    }
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut inner: Vec<_> = std::fs::read_dir(p)
                .map_err(|e| ImportError::Io(format!("{}: {e}", p.display())))?
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect();
            inner.sort();
            files.extend(inner);
        } else {
            files.push(p.clone());
        }
    }
    let dir = &config.models_dir;
    std::fs::create_dir_all(dir).map_err(|e| ImportError::Io(format!("{}: {e}", dir.display())))?;
    let group = nix::unistd::Group::from_name("airgate").ok().flatten();
    let mut report = String::new();
    let mut refused = 0;
    for src in files {
        let io = |e: std::io::Error| ImportError::Io(format!("{}: {e}", src.display()));
        let tmp = dir.join(format!(
            ".import-{}-{}",
            std::process::id(),
            src.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ));
        let digest = {
            use sha2::Digest as _;
            use std::io::Write as _;
            let mut input = std::fs::File::open(&src).map_err(io)?;
            let mut out = std::fs::File::create(&tmp).map_err(io)?;
            let mut hasher = sha2::Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = input.read(&mut buf).map_err(io)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n]).map_err(|e| {
                    let _ = std::fs::remove_file(&tmp);
                    ImportError::Io(format!("{}: {e}", tmp.display()))
                })?;
            }
            out.sync_all().map_err(io)?;
            <[u8; 32]>::from(hasher.finalize())
        };
        let Some((name, models)) = wanted.get(&digest) else {
            let _ = std::fs::remove_file(&tmp);
            refused += 1;
            let _ = writeln!(
                report,
                "refused  {}: sha256 {} is not in the manifest of bundle v{}",
                src.display(),
                crate::keys::hex(&digest),
                active.version()
            );
            continue;
        };
        let mode = if group.is_some() { 0o640 } else { 0o644 };
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(io)?;
        if let Some(g) = &group {
            nix::unistd::chown(&tmp, Some(nix::unistd::Uid::from_raw(0)), Some(g.gid))
                .map_err(|e| io(e.into()))?;
        }
        let dest = dir.join(name);
        std::fs::rename(&tmp, &dest).map_err(io)?;
        let _ = writeln!(
            report,
            "imported {} -> {} (sha256 {}; model {})",
            src.display(),
            dest.display(),
            crate::keys::hex(&digest),
            models.join(", ")
        );
    }
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| ImportError::Io(format!("{}: {e}", dir.display())))?;
    if refused > 0 {
        return Err(ImportError::Refused(report));
    }
    let _ = writeln!(
        report,
        "the daemon checks and loads them at its next look at the bundle (policy.poll_interval)"
    );
    Ok(report)
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

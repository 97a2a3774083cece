//! ONNX models through tract: loaded and optimised once (symbolic batch and
//! sequence dimensions stay symbolic), run on a bounded pool of blocking
//! threads. A request beyond the pool and its queue is refused at once
//! (503), never queued without bound; a run holds its place in the pool
//! until tract returns, whether or not anyone still waits for its answer.
//!
//! Tensors come in already checked against the model's declared inputs
//! (see `kserve`): tract never sees a wrong datatype, rank or size. What a
//! run may cost is bounded here: text batches by batch × padded sequence
//! (`onnx.max_batch_tokens`), every run by the activation memory its plan
//! would hold at its busiest step (`onnx.max_run_bytes`), estimated from the
//! plan's symbolic shapes before tract starts.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::DimLike as _;

/// Default `onnx.max_batch_tokens`: batch × padded sequence per text request.
pub const DEFAULT_MAX_BATCH_TOKENS: u64 = 32_768;
/// Default `onnx.max_run_bytes`: one run's estimated activation memory.
pub const DEFAULT_MAX_RUN_BYTES: u64 = 1 << 30;

/// A KServe v2 datatype that tract can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    Bool,
    U8,
    U16,
    U32,
    U64,
    I8,
    I16,
    I32,
    I64,
    F16,
    F32,
    F64,
}

impl DType {
    pub const ALL: [DType; 12] = [
        Self::Bool,
        Self::U8,
        Self::U16,
        Self::U32,
        Self::U64,
        Self::I8,
        Self::I16,
        Self::I32,
        Self::I64,
        Self::F16,
        Self::F32,
        Self::F64,
    ];

    /// The protocol's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Bool => "BOOL",
            Self::U8 => "UINT8",
            Self::U16 => "UINT16",
            Self::U32 => "UINT32",
            Self::U64 => "UINT64",
            Self::I8 => "INT8",
            Self::I16 => "INT16",
            Self::I32 => "INT32",
            Self::I64 => "INT64",
            Self::F16 => "FP16",
            Self::F32 => "FP32",
            Self::F64 => "FP64",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.name() == name)
    }

    /// Bytes per element in the binary tensor data extension.
    pub fn size(self) -> usize {
        match self {
            Self::Bool | Self::U8 | Self::I8 => 1,
            Self::U16 | Self::I16 | Self::F16 => 2,
            Self::U32 | Self::I32 | Self::F32 => 4,
            Self::U64 | Self::I64 | Self::F64 => 8,
        }
    }

    pub fn from_tract(dt: DatumType) -> Option<Self> {
        Some(match dt {
            DatumType::Bool => Self::Bool,
            DatumType::U8 => Self::U8,
            DatumType::U16 => Self::U16,
            DatumType::U32 => Self::U32,
            DatumType::U64 => Self::U64,
            DatumType::I8 => Self::I8,
            DatumType::I16 => Self::I16,
            DatumType::I32 => Self::I32,
            DatumType::I64 => Self::I64,
            DatumType::F16 => Self::F16,
            DatumType::F32 => Self::F32,
            DatumType::F64 => Self::F64,
            _ => return None,
        })
    }

    pub fn to_tract(self) -> DatumType {
        match self {
            Self::Bool => DatumType::Bool,
            Self::U8 => DatumType::U8,
            Self::U16 => DatumType::U16,
            Self::U32 => DatumType::U32,
            Self::U64 => DatumType::U64,
            Self::I8 => DatumType::I8,
            Self::I16 => DatumType::I16,
            Self::I32 => DatumType::I32,
            Self::I64 => DatumType::I64,
            Self::F16 => DatumType::F16,
            Self::F32 => DatumType::F32,
            Self::F64 => DatumType::F64,
        }
    }
}

/// One dimension of a declared shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dim {
    Fixed(usize),
    /// A symbolic dimension (batch, sequence): any size, the same wherever
    /// the same symbol appears.
    Symbol(String),
}

#[derive(Clone, Debug)]
pub struct TensorSpec {
    pub name: String,
    pub datatype: DType,
    pub shape: Vec<Dim>,
}

impl TensorSpec {
    /// The protocol's shape: -1 for a variable dimension.
    pub fn wire_shape(&self) -> Vec<i64> {
        self.shape
            .iter()
            .map(|d| match d {
                Dim::Fixed(n) => i64::try_from(*n).unwrap_or(-1),
                Dim::Symbol(_) => -1,
            })
            .collect()
    }
}

impl Serialize for TensorSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serde_json::json!({
            "name": self.name,
            "datatype": self.datatype.name(),
            "shape": self.wire_shape(),
        })
        .serialize(s)
    }
}

type Plan = Arc<TypedRunnableModel>;

/// A loaded, optimised ONNX model and its pool.
pub struct OnnxModel {
    pub id: String,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    plan: Plan,
    footprint: Footprint,
    pool: Pool,
    pub workers: usize,
    pub memory_bytes: u64,
    /// Largest input tensor accepted, in elements.
    pub max_elements: u64,
    /// Most tokens (batch × padded sequence) one text request may run;
    /// set before `set_tokenizer`, which holds the tokenizer to it.
    pub max_batch_tokens: u64,
    /// Most activation memory one run may be estimated to hold, bytes; set
    /// before `set_tokenizer`, which holds one longest text to it.
    pub max_run_bytes: u64,
    /// Gives the model's memory back to the budget when it is dropped.
    pub(crate) release: Option<Box<dyn Send + Sync>>,
    /// The manifest's `tokenizer` file (a Hugging Face tokenizer.json): text
    /// in, for `/v1/embeddings`.
    pub tokenizer: Option<tokenizers::Tokenizer>,
}

/// Sentence embeddings of a batch of texts.
#[derive(Debug)]
pub struct Embedded {
    /// L2-normalised, one per text.
    pub vectors: Vec<Vec<f32>>,
    /// Tokens the model processed (padding excluded).
    pub tokens: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0} requests are running or waiting for this model")]
    Overloaded(usize),
    #[error(transparent)]
    TooLarge(#[from] TooLarge),
    #[error("{0}")]
    Failed(String),
}

/// A run refused before tract starts: bigger than this server runs at once.
/// The request must change (fewer or shorter inputs), not be retried.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TooLarge {
    #[error(
        "{batch} texts padded to {seq} tokens are {tokens} tokens; the limit is {limit} per request (onnx.max_batch_tokens): send fewer or shorter texts"
    )]
    Tokens {
        batch: usize,
        seq: usize,
        tokens: u64,
        limit: u64,
    },
    #[error(
        "this run would hold {} of activations; the limit is {} MiB per request (onnx.max_run_bytes): send fewer or smaller inputs",
        about_mib(.bytes),
        mib(.limit)
    )]
    Activations {
        /// The estimate; `None` when it does not fit in 64 bits.
        bytes: Option<u64>,
        limit: u64,
    },
}

fn mib(bytes: &u64) -> u64 {
    *bytes >> 20
}

fn about_mib(bytes: &Option<u64>) -> String {
    match bytes {
        Some(b) => format!("about {} MiB", b.div_ceil(1 << 20)),
        None => "more than 2^64 bytes".to_owned(),
    }
}

fn err(e: &anyhow::Error) -> String {
    format!("{e:#}")
}

fn describe(model: &TypedModel, outlets: &[OutletId]) -> Result<Vec<TensorSpec>, String> {
    outlets
        .iter()
        .map(|o| {
            let fact = model.outlet_fact(*o).map_err(|e| err(&e))?;
            // ONNX names its values; tract keeps them as outlet labels.
            let name = model
                .outlet_label(*o)
                .map_or_else(|| model.node(o.node).name.clone(), str::to_owned);
            let datatype = DType::from_tract(fact.datum_type)
                .ok_or_else(|| format!("{name}: datatype {:?} is not served", fact.datum_type))?;
            let shape = fact
                .shape
                .iter()
                .map(|d| match d.to_usize() {
                    Ok(n) => Dim::Fixed(n),
                    Err(_) => Dim::Symbol(d.to_string()),
                })
                .collect();
            Ok(TensorSpec {
                name,
                datatype,
                shape,
            })
        })
        .collect()
}

impl OnnxModel {
    /// Loads and optimises `path` (blocking; seconds for large models).
    pub fn load(
        id: &str,
        path: &Path,
        workers: usize,
        queue: usize,
        memory_bytes: u64,
        max_elements: u64,
    ) -> Result<Self, String> {
        let shown = path.display();
        let inference = onnx()
            .model_for_path(path)
            .map_err(|e| format!("{shown}: tract could not read it as ONNX: {}", err(&e)))?;
        let typed = inference
            .into_typed()
            .map_err(|e| format!("{shown}: tract's analysis failed: {}", err(&e)))?;
        let inputs = describe(&typed, typed.input_outlets().map_err(|e| err(&e))?)?;
        let outputs = describe(&typed, typed.output_outlets().map_err(|e| err(&e))?)?;
        let plan = typed
            .into_decluttered()
            .and_then(|m| m.into_optimized())
            .and_then(|m| m.into_runnable())
            .map_err(|e| format!("{shown}: tract could not optimise it: {}", err(&e)))?;
        let footprint = Footprint::of(&plan)
            .map_err(|e| format!("{shown}: tract's plan could not be measured: {}", err(&e)))?;
        let workers = workers.max(1);
        Ok(Self {
            id: id.to_owned(),
            inputs,
            outputs,
            plan,
            footprint,
            pool: Pool::new(workers, queue),
            workers,
            memory_bytes,
            max_elements,
            max_batch_tokens: DEFAULT_MAX_BATCH_TOKENS,
            max_run_bytes: DEFAULT_MAX_RUN_BYTES,
            release: None,
            tokenizer: None,
        })
    }

    /// The activation memory a run on inputs of these shapes (in declared
    /// order) would hold at its busiest step, estimated from the plan;
    /// refused beyond `max_run_bytes`. Cheap: one pass over the plan.
    pub fn check_activations(&self, shapes: &[&[usize]]) -> Result<u64, TooLarge> {
        match self.footprint.peak_bytes(shapes) {
            Some(bytes) if bytes <= self.max_run_bytes => Ok(bytes),
            bytes => Err(TooLarge::Activations {
                bytes,
                limit: self.max_run_bytes,
            }),
        }
    }

    /// Reads a tokenizer.json; batches are padded to their longest text and
    /// truncated as the file says (512 tokens when it does not). One text
    /// of that length must fit `max_batch_tokens` and `max_run_bytes`, so a
    /// single text (the guard's prompt) is never refused for its length.
    pub fn set_tokenizer(&mut self, path: &Path) -> Result<(), String> {
        let mut t = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| format!("{}: not a tokenizer.json: {e}", path.display()))?;
        t.with_padding(Some(tokenizers::PaddingParams {
            strategy: tokenizers::PaddingStrategy::BatchLongest,
            ..Default::default()
        }));
        if t.get_truncation().is_none() {
            t.with_truncation(Some(tokenizers::TruncationParams {
                max_length: 512,
                ..Default::default()
            }))
            .map_err(|e| e.to_string())?;
        }
        for input in &self.inputs {
            if !matches!(
                input.name.as_str(),
                "input_ids" | "attention_mask" | "token_type_ids"
            ) {
                return Err(format!(
                    "input {:?}: a text model takes input_ids, attention_mask and token_type_ids",
                    input.name
                ));
            }
        }
        let longest = t.get_truncation().map_or(512, |t| t.max_length);
        if longest as u64 > self.max_batch_tokens {
            return Err(format!(
                "{}: the tokenizer truncates texts at {longest} tokens, more than onnx.max_batch_tokens ({}) lets one request run",
                path.display(),
                self.max_batch_tokens
            ));
        }
        let shape = [1, longest];
        let shapes = vec![&shape[..]; self.inputs.len()];
        self.check_activations(&shapes).map_err(|e| {
            format!(
                "{}: one text of {longest} tokens (where the tokenizer truncates): {e}",
                path.display()
            )
        })?;
        self.tokenizer = Some(t);
        Ok(())
    }

    /// The model's inputs for `texts`: tokenized as a batch, padded to its
    /// longest, each declared input (input_ids, attention_mask,
    /// token_type_ids) filled; also the mask and the padded length. A batch
    /// over `max_batch_tokens` or `max_run_bytes` is refused before anything
    /// is padded or run.
    fn text_inputs(&self, texts: &[String]) -> Result<(Vec<Tensor>, Vec<i64>, usize), RunError> {
        let failed = |e: String| RunError::Failed(e);
        let tokenizer = self
            .tokenizer
            .as_ref()
            .ok_or_else(|| failed("this model has no tokenizer in the manifest".to_owned()))?;
        let encodings = tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| failed(format!("tokenizing failed: {e}")))?;
        self.encoding_inputs(&encodings)
    }

    /// [`Self::text_inputs`] for texts already tokenized.
    fn encoding_inputs(
        &self,
        encodings: &[tokenizers::Encoding],
    ) -> Result<(Vec<Tensor>, Vec<i64>, usize), RunError> {
        let failed = |e: String| RunError::Failed(e);
        let batch = encodings.len();
        let seq = encodings
            .iter()
            .map(|e| e.get_ids().len())
            .max()
            .unwrap_or(0)
            .max(1);
        let tokens = (batch as u64).saturating_mul(seq as u64);
        if tokens > self.max_batch_tokens {
            return Err(TooLarge::Tokens {
                batch,
                seq,
                tokens,
                limit: self.max_batch_tokens,
            }
            .into());
        }
        let shape = [batch, seq];
        self.check_activations(&vec![&shape[..]; self.inputs.len()])?;
        let (mut ids, mut mask, mut types) = (Vec::new(), Vec::new(), Vec::new());
        let padded = |values: &[u32]| {
            let pad = seq - values.len();
            values
                .iter()
                .map(|v| i64::from(*v))
                .chain(std::iter::repeat_n(0, pad))
                .collect::<Vec<_>>()
        };
        for e in encodings {
            ids.extend(padded(e.get_ids()));
            mask.extend(padded(e.get_attention_mask()));
            types.extend(padded(e.get_type_ids()));
        }
        let tensor = |v: &[i64]| Tensor::from_shape(&[batch, seq], v).map_err(|e| failed(err(&e)));
        let mut inputs = Vec::with_capacity(self.inputs.len());
        for input in &self.inputs {
            inputs.push(match input.name.as_str() {
                "input_ids" => tensor(&ids)?,
                "attention_mask" => tensor(&mask)?,
                _ => tensor(&types)?,
            });
        }
        Ok((inputs, mask, seq))
    }

    /// Tokenizes, runs and pools `texts` (blocking): the model's pooled
    /// [batch, dim] output when it has one, else the mean of a [batch, seq,
    /// dim] output over the attention mask; then L2-normalised.
    pub fn embed_blocking(&self, texts: &[String]) -> Result<Embedded, RunError> {
        let failed = |e: String| RunError::Failed(e);
        let (inputs, mask, seq) = self.text_inputs(texts)?;
        let tokens = mask.iter().filter(|m| **m != 0).count() as u64;
        let outputs = self.run_blocking(inputs)?;
        let pooled = self
            .outputs
            .iter()
            .position(|o| o.datatype == DType::F32 && o.shape.len() == 2);
        let vectors: Vec<Vec<f32>> = if let Some(i) = pooled {
            let view = outputs[i]
                .to_plain_array_view::<f32>()
                .map_err(|e| failed(err(&e)))?;
            view.outer_iter()
                .map(|row| row.iter().copied().collect())
                .collect()
        } else {
            let i = self
                .outputs
                .iter()
                .position(|o| o.datatype == DType::F32 && o.shape.len() == 3)
                .ok_or_else(|| {
                    failed("no [batch, dim] or [batch, seq, dim] FP32 output to pool".to_owned())
                })?;
            let view = outputs[i]
                .to_plain_array_view::<f32>()
                .map_err(|e| failed(err(&e)))?;
            view.outer_iter()
                .enumerate()
                .map(|(b, tokens)| {
                    let dim = tokens.shape().last().copied().unwrap_or(0);
                    let mut sum = vec![0f32; dim];
                    let mut n = 0f32;
                    for (t, row) in tokens.outer_iter().enumerate() {
                        if mask[b * seq + t] != 0 {
                            n += 1.0;
                            for (s, v) in sum.iter_mut().zip(row.iter()) {
                                *s += v;
                            }
                        }
                    }
                    sum.iter().map(|s| s / n.max(1.0)).collect()
                })
                .collect()
        };
        let vectors = vectors
            .into_iter()
            .map(|v| {
                let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
                v.into_iter().map(|x| x / norm).collect()
            })
            .collect();
        Ok(Embedded { vectors, tokens })
    }

    /// A classifier's probabilities for one text (its [1, labels] FP32 output).
    /// Scores `text`: every label's highest score over windows of the text
    /// as long as the tokenizer takes (its truncation length), so what lies
    /// past the first window is scored too — a harmless preamble cannot
    /// push the rest out of the guard's sight. A text too long to score
    /// within the pool's bounds is refused, never scored in part.
    pub fn classify_blocking(&self, text: &str) -> Result<Vec<f32>, RunError> {
        let failed = |e: String| RunError::Failed(e);
        let tokenizer = self
            .tokenizer
            .as_ref()
            .ok_or_else(|| failed("this model has no tokenizer in the manifest".to_owned()))?;
        let first = tokenizer
            .encode(text, true)
            .map_err(|e| failed(format!("tokenizing failed: {e}")))?;
        let mut windows = Vec::new();
        let mut todo = vec![first];
        while let Some(mut e) = todo.pop() {
            todo.extend(e.take_overflowing());
            windows.push(e);
        }
        let seq = windows
            .iter()
            .map(|e| e.get_ids().len())
            .max()
            .unwrap_or(1)
            .max(1);
        let per_run = usize::try_from(self.max_batch_tokens / seq as u64)
            .unwrap_or(usize::MAX)
            .max(1);
        let mut best: Vec<f32> = Vec::new();
        for batch in windows.chunks(per_run) {
            let (inputs, _, _) = self.encoding_inputs(batch)?;
            let outputs = self.run_blocking(inputs)?;
            let scores: Vec<f32> = outputs
                .first()
                .ok_or_else(|| failed("the classifier returned nothing".to_owned()))?
                .to_plain_array_view::<f32>()
                .map_err(|e| failed(err(&e)))?
                .iter()
                .copied()
                .collect();
            let labels = scores.len() / batch.len().max(1);
            for row in scores.chunks(labels.max(1)) {
                if best.is_empty() {
                    best = row.to_vec();
                } else {
                    for (b, s) in best.iter_mut().zip(row) {
                        *b = b.max(*s);
                    }
                }
            }
        }
        Ok(best)
    }

    /// `classify_blocking` on the pool, under the same bounds as `run`.
    pub async fn classify(self: &Arc<Self>, text: String) -> Result<Vec<f32>, RunError> {
        self.pooled(move |m| m.classify_blocking(&text)).await
    }

    /// `embed_blocking` on the pool, under the same bounds as `run`.
    pub async fn embed(self: &Arc<Self>, texts: Vec<String>) -> Result<Embedded, RunError> {
        self.pooled(move |m| m.embed_blocking(&texts)).await
    }

    /// Requests running or waiting.
    pub fn load_now(&self) -> usize {
        self.pool.load_now()
    }

    pub fn capacity(&self) -> usize {
        self.pool.capacity
    }

    /// `work` on the model's pool (see `Pool::run`).
    async fn pooled<T: Send + 'static>(
        self: &Arc<Self>,
        work: impl FnOnce(&Self) -> Result<T, RunError> + Send + 'static,
    ) -> Result<T, RunError> {
        let me = Arc::clone(self);
        self.pool.run(move || work(&me)).await
    }

    /// Runs the model on checked inputs (in declared order), on the pool.
    pub async fn run(self: &Arc<Self>, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RunError> {
        self.pooled(move |m| m.run_blocking(inputs)).await
    }

    /// Runs the model on this thread (benchmarks, tests, the blocking pool).
    pub fn run_blocking(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RunError> {
        let inputs: TVec<TValue> = inputs.into_iter().map(TValue::from).collect();
        let outputs = self
            .plan
            .run(inputs)
            .map_err(|e| RunError::Failed(err(&e)))?;
        Ok(outputs.into_iter().map(TValue::into_tensor).collect())
    }
}

/// A bounded pool for blocking work: at most `workers` run at once, `queue`
/// more wait, anything beyond is refused at once (never an unbounded queue).
struct Pool {
    running: Arc<Semaphore>,
    /// Requests running or waiting: each `Seat` alive.
    in_system: Arc<AtomicUsize>,
    capacity: usize,
}

impl Pool {
    fn new(workers: usize, queue: usize) -> Self {
        Self {
            running: Arc::new(Semaphore::new(workers)),
            in_system: Arc::new(AtomicUsize::new(0)),
            capacity: workers.saturating_add(queue),
        }
    }

    fn load_now(&self) -> usize {
        self.in_system.load(Ordering::Relaxed)
    }

    /// Runs `work` on a blocking thread once a worker is free. The seat and
    /// the permit move into the work: a caller that goes away (a client
    /// that disconnects, the guard's timeout) frees its place while it
    /// waits, but a run that has started holds both until tract returns,
    /// so abandoned runs cannot pile up beyond `workers`.
    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> Result<T, RunError> + Send + 'static,
    ) -> Result<T, RunError> {
        let seat = Seat::take(&self.in_system, self.capacity)?;
        let permit: OwnedSemaphorePermit = Arc::clone(&self.running)
            .acquire_owned()
            .await
            .map_err(|e| RunError::Failed(e.to_string()))?;
        tokio::task::spawn_blocking(move || {
            // The seat goes first (tuple order), so whoever gets the permit
            // next already finds the count down.
            let held = (seat, permit);
            let out = work();
            drop(held);
            out
        })
        .await
        .map_err(|e| RunError::Failed(format!("the inference thread failed: {e}")))?
    }
}

/// One request counted against a pool's capacity until it is dropped.
struct Seat(Arc<AtomicUsize>);

impl Seat {
    fn take(count: &Arc<AtomicUsize>, capacity: usize) -> Result<Self, RunError> {
        let before = count.fetch_add(1, Ordering::AcqRel);
        let seat = Self(Arc::clone(count));
        if before >= capacity {
            return Err(RunError::Overloaded(before));
        }
        Ok(seat)
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a run holds, step by step, as tract's plan runs it: each step's
/// outputs in bytes (symbolic in the model's input dimensions), and the
/// earlier steps whose outputs tract lets go once that step has run.
/// Weights (constants) are not counted: they are the model's own memory.
struct Footprint {
    /// Per step, the bytes of its outputs.
    bytes: Vec<TDim>,
    /// Per step, the steps whose outputs are dropped after it.
    frees: Vec<Vec<usize>>,
    /// Per model input, the symbol each axis is, where it is one.
    inputs: Vec<Vec<Option<Symbol>>>,
}

impl Footprint {
    fn of(plan: &TypedRunnableModel) -> TractResult<Self> {
        let model = plan.model();
        let order = plan.order_without_consts();
        let mut step_of = vec![None; model.nodes().len()];
        for (step, node) in order.iter().enumerate() {
            step_of[*node] = Some(step);
        }
        // As tract's flush lists: a value is dropped after the last step
        // that reads it; the model's outputs, and values nothing reads,
        // are kept to the end.
        let mut last_read = vec![0usize; order.len()];
        for (step, node) in order.iter().enumerate() {
            for input in &model.node(*node).inputs {
                if let Some(s) = step_of[input.node] {
                    last_read[s] = step;
                }
            }
        }
        for output in model.output_outlets()? {
            if let Some(s) = step_of[output.node] {
                last_read[s] = order.len();
            }
        }
        let mut frees = vec![Vec::new(); order.len()];
        for (s, at) in last_read.iter().enumerate() {
            if *at != 0 && *at < order.len() {
                frees[*at].push(s);
            }
        }
        let bytes = order
            .iter()
            .map(|node| {
                model
                    .node(*node)
                    .outputs
                    .iter()
                    .map(|o| o.fact.mem_size())
                    .sum::<TDim>()
            })
            .collect();
        let inputs = model
            .input_outlets()?
            .iter()
            .map(|o| -> TractResult<Vec<Option<Symbol>>> {
                Ok(model
                    .outlet_fact(*o)?
                    .shape
                    .iter()
                    .map(|d| match d {
                        TDim::Sym(s) => Some(s.clone()),
                        _ => None,
                    })
                    .collect())
            })
            .collect::<TractResult<Vec<_>>>()?;
        Ok(Self {
            bytes,
            frees,
            inputs,
        })
    }

    /// The most bytes alive at any step for inputs of these shapes; `None`
    /// when that does not fit in 64 bits.
    fn peak_bytes(&self, shapes: &[&[usize]]) -> Option<u64> {
        let mut values = SymbolValues::default();
        for (symbols, shape) in self.inputs.iter().zip(shapes) {
            for (symbol, n) in symbols.iter().zip(shape.iter()) {
                if let Some(s) = symbol {
                    values.set(s, i64::try_from(*n).ok()?);
                }
            }
        }
        let bytes = self
            .bytes
            .iter()
            .map(|b| eval_bytes(b, &values))
            .collect::<Option<Vec<u64>>>()?;
        peak(&bytes, &self.frees)
    }
}

/// A step's bytes for these symbol values: `None` when it overflows, 0 when
/// it names a symbol only the run itself sets (a data-dependent size,
/// which cannot be known before the run).
fn eval_bytes(bytes: &TDim, values: &SymbolValues) -> Option<u64> {
    match bytes.maybe_eval_to_i64(values) {
        Some(n) => Some(u64::try_from(n).unwrap_or(0)),
        None if bytes.symbols().iter().any(|s| values.get(s).is_none()) => Some(0),
        None => None,
    }
}

/// The most bytes alive at once when each step adds its own and then drops
/// those `frees` names (its inputs live while it runs).
fn peak(bytes: &[u64], frees: &[Vec<usize>]) -> Option<u64> {
    let (mut live, mut most) = (0u64, 0u64);
    for (step, b) in bytes.iter().enumerate() {
        live = live.checked_add(*b)?;
        most = most.max(live);
        for s in frees.get(step).into_iter().flatten() {
            live = live.saturating_sub(bytes.get(*s).copied().unwrap_or(0));
        }
    }
    Some(most)
}

#[cfg(test)]
mod tests;

//! GGUF language models on llama.cpp.
//!
//! [`Models`] keeps the set of loaded models in step with the bundle in
//! force: every file is hashed against the manifest before it is loaded,
//! each model's memory (weights plus KV cache) is admitted against a budget,
//! and models become ready one by one. Each loaded model has one [`Engine`]:
//! a thread owning the llama context with several sequence slots. Every step
//! decodes one batch holding the next token of every generating sequence and
//! chunks of new prompts (continuous batching), so concurrent clients share
//! the model instead of queueing. Free slots go to the tenant holding the
//! fewest, then first come first served within a tenant.

use std::collections::{BTreeMap, VecDeque};
use std::io::Read as _;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, mpsc};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::token::logit_bias::LlamaLogitBias;
use serde::Serialize;
use sha2::Digest as _;
use tokio::sync::mpsc::UnboundedSender;

use airgate_policy::bundle::{Bundle, Format};

use crate::config::LlmConfig;
use crate::heartbeat::{Heartbeat, Worker};

/// The GBNF grammar for `response_format: json_object`: one JSON object.
const JSON_OBJECT_GRAMMAR: &str = r#"root ::= object
value ::= object | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ("," ws string ":" ws value)* )? "}" ws
array ::= "[" ws ( value ("," ws value)* )? "]" ws
string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) )* "\"" ws
number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws
ws ::= | " " | "\n" [ \t]{0,20}
"#;

/// llama.cpp's backend is process-wide and initialised once.
fn backend() -> Result<&'static LlamaBackend, String> {
    static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
            LlamaBackend::init().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// How a request wants its tokens chosen.
#[derive(Clone, Debug)]
pub struct Sampling {
    /// 0: greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0: off.
    pub top_k: i32,
    pub seed: u32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Constrain the output to one JSON object.
    pub json_object: bool,
    /// Never end at an end-of-generation token: generate max_tokens
    /// (llama-server's `ignore_eos`, for benchmarks and tests).
    pub ignore_eos: bool,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            json_object: false,
            ignore_eos: false,
        }
    }
}

/// One generation, handed to an engine.
pub struct Job {
    pub tenant: String,
    pub prompt: Vec<LlamaToken>,
    pub sampling: Sampling,
    pub max_tokens: u32,
    pub stop: Vec<String>,
    /// Where the text goes; dropping the receiver cancels the job within a step.
    pub out: UnboundedSender<Out>,
}

/// What an engine sends back for a job.
#[derive(Debug)]
pub enum Out {
    /// The job has a slot and its prompt is being decoded.
    Started,
    /// Generated text (whole UTF-8 characters, stop sequences held back),
    /// and how many tokens have been generated so far.
    Text(String, u32),
    Done(Finish),
    Failed(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    Stop,
    Length,
}

#[derive(Clone, Copy, Debug)]
pub struct Finish {
    pub reason: FinishReason,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Prompt tokens whose KV came from the slot's cache (not decoded again).
    pub cached_tokens: u32,
}

/// Why a job was not taken.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("every slot of model {model} is busy and its queue ({queue}) is full")]
    Busy { model: String, queue: usize },
    #[error("model {0} is being unloaded")]
    Gone(String),
}

/// A loaded model: the handle requests use. The engine thread stops once
/// the last handle is dropped and its sequences are done.
pub struct Engine {
    pub id: String,
    model: Arc<LlamaModel>,
    template: Option<LlamaChatTemplate>,
    jobs: Mutex<mpsc::Sender<Job>>,
    /// Jobs submitted and not yet finished.
    in_system: Arc<AtomicUsize>,
    capacity: usize,
    queue: usize,
    pub slots: u32,
    pub context: u32,
    pub memory_bytes: u64,
}

/// Longest text handed to llama.cpp's tokenizer in one call.
const PIECE_BYTES: usize = 4096;

/// `text` in pieces of at most [`PIECE_BYTES`] (longer only where a single
/// character is), each cut before a `<` (where control-token text starts)
/// or else before whitespace, else at a character boundary.
fn pieces(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        if rest.len() <= PIECE_BYTES {
            return Some(std::mem::take(&mut rest));
        }
        let mut limit = PIECE_BYTES;
        while !rest.is_char_boundary(limit) {
            limit -= 1;
        }
        let window = &rest[..limit];
        // Never inside a word: a vocabulary that prefixes each call's text
        // with a space would otherwise see two words where policy saw one.
        // A window with neither is one long word without control-token
        // text: it runs on to the next cut point, which costs linear time.
        let cut_at = |c: char| c == '<' || c.is_whitespace();
        let cut = window
            .rfind('<')
            .filter(|&i| i > 0)
            .or_else(|| window.rfind(char::is_whitespace).filter(|&i| i > 0))
            .or_else(|| rest[limit..].find(cut_at).map(|i| limit + i))
            .unwrap_or(rest.len());
        let (piece, tail) = rest.split_at(cut);
        rest = tail;
        Some(piece)
    })
}

impl Engine {
    /// Tokenizes a raw completion prompt the way the model expects (BOS
    /// added if it wants one, control tokens written as text recognised, as
    /// llama-server does). In pieces of at most [`PIECE_BYTES`], cut before
    /// a `<` or a space: llama.cpp's search for control-token text grows
    /// with the square of the occurrences in one call, so a prompt packed
    /// with them would cost seconds per megabyte.
    pub fn tokenize(&self, text: &str) -> Vec<LlamaToken> {
        let vocab = self.model.vocab();
        let mut out = Vec::new();
        for (i, piece) in pieces(text).enumerate() {
            out.extend(vocab.tokenize(piece.as_bytes(), i == 0, true));
        }
        out
    }

    /// The model's own chat template applied to `messages` (role, content),
    /// ending with the assistant's turn opened, as tokens. The template's
    /// text has its control tokens recognised; each message's content is
    /// tokenized as plain text, exactly as the caller sent it (and policy
    /// checked it): `<end_of_turn>` typed by a user is those characters,
    /// not a turn boundary, and costs linear time.
    pub fn chat_tokens(&self, messages: &[(String, String)]) -> Result<Vec<LlamaToken>, String> {
        let template = self.template.as_ref().ok_or_else(|| {
            format!(
                "model {} has no chat template; use /v1/completions",
                self.id
            )
        })?;
        // Each content is rendered as a marker no caller can guess, then
        // put back in as text between the template's own pieces.
        let mut nonce = [0u8; 12];
        getrandom::fill(&mut nonce).map_err(|e| format!("no randomness for the template: {e}"))?;
        let nonce = crate::keys::hex(&nonce);
        let marker = |i: usize| format!("airgatemsg{nonce}n{i}e");
        let chat = messages
            .iter()
            .enumerate()
            .map(|(i, (role, _))| LlamaChatMessage::new(role.clone(), marker(i)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("a message cannot be passed to the template: {e}"))?;
        let rendered = self
            .model
            .apply_chat_template(template, &chat, true)
            .map_err(|e| format!("the model's chat template failed: {e}"))?;
        let vocab = self.model.vocab();
        let mut out = Vec::new();
        // BOS (if the model wants one) goes before the first token only.
        let mut first = true;
        let mut push = |out: &mut Vec<LlamaToken>, text: &str, control: bool| {
            for piece in pieces(text) {
                out.extend(vocab.tokenize(piece.as_bytes(), first, control));
                first = false;
            }
        };
        let prefix = format!("airgatemsg{nonce}n");
        let mut rest = rendered.as_str();
        while let Some(at) = rest.find(&prefix) {
            push(&mut out, &rest[..at], true);
            let after = &rest[at + prefix.len()..];
            let digits = after.bytes().take_while(u8::is_ascii_digit).count();
            let index = after[..digits].parse::<usize>().ok();
            match (
                index.and_then(|i| messages.get(i)),
                after[digits..].strip_prefix('e'),
            ) {
                (Some((_, content)), Some(tail)) => {
                    push(&mut out, content, false);
                    rest = tail;
                }
                // Not one of ours after all (cannot happen with a fresh
                // nonce): kept as the template's text.
                _ => {
                    push(&mut out, &rest[at..at + prefix.len()], true);
                    rest = after;
                }
            }
        }
        push(&mut out, rest, true);
        Ok(out)
    }

    /// Queues a job; refuses when every slot is busy and the queue is full.
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        let taken = self.in_system.fetch_add(1, Ordering::AcqRel);
        if taken >= self.capacity {
            self.in_system.fetch_sub(1, Ordering::AcqRel);
            return Err(SubmitError::Busy {
                model: self.id.clone(),
                queue: self.queue,
            });
        }
        let sent = self
            .jobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .send(job);
        if sent.is_err() {
            self.in_system.fetch_sub(1, Ordering::AcqRel);
            return Err(SubmitError::Gone(self.id.clone()));
        }
        Ok(())
    }

    /// Jobs in a slot or waiting for one.
    pub fn load(&self) -> usize {
        self.in_system.load(Ordering::Acquire)
    }
}

/// Where a model of the bundle stands on this host.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ModelState {
    Checking {
        done_bytes: u64,
        total_bytes: u64,
    },
    Loading,
    Ready {
        memory_bytes: u64,
        slots: u32,
        context: u32,
    },
    Refused {
        reason: String,
    },
}

/// A model that finished loading, waiting to join its map.
enum Loaded {
    Llm(String, Arc<Engine>),
    Onnx(String, Arc<crate::onnx::OnnxModel>),
}

/// The files of a model: (path in models_dir, expected sha256, role).
type Files = Vec<(PathBuf, [u8; 32], String)>;

/// (size, mtime in ns) of each of a model's files; None where missing.
type FileStat = Vec<Option<(u64, i64)>>;

/// The loaded models, kept in step with the bundle in force.
pub struct Models {
    engines: ArcSwap<BTreeMap<String, Arc<Engine>>>,
    onnx: ArcSwap<BTreeMap<String, Arc<crate::onnx::OnnxModel>>>,
    states: Arc<Mutex<BTreeMap<String, ModelState>>>,
    /// What each known model was loaded or refused for (the files' digests),
    /// so an unchanged bundle does not reload or rehash.
    wanted: Mutex<BTreeMap<String, String>>,
    /// Memory promised to loaded and loading models.
    committed: Arc<Mutex<u64>>,
    /// The files' (size, mtime) when each model was last tried: a refused
    /// model is tried again when they change (a file copied in, replaced).
    tried: Mutex<BTreeMap<String, FileStat>>,
    ready_tx: Arc<Mutex<Vec<Loaded>>>,
}

impl Default for Models {
    fn default() -> Self {
        Self::new()
    }
}

impl Models {
    pub fn new() -> Self {
        Self {
            engines: ArcSwap::from_pointee(BTreeMap::new()),
            onnx: ArcSwap::from_pointee(BTreeMap::new()),
            states: Arc::new(Mutex::new(BTreeMap::new())),
            wanted: Mutex::new(BTreeMap::new()),
            committed: Arc::new(Mutex::new(0)),
            tried: Mutex::new(BTreeMap::new()),
            ready_tx: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// The engine serving `id`, if it is loaded.
    pub fn get(&self, id: &str) -> Option<Arc<Engine>> {
        self.adopt_ready();
        self.engines.load().get(id).cloned()
    }

    /// The ONNX model serving `id`, if it is loaded.
    pub fn get_onnx(&self, id: &str) -> Option<Arc<crate::onnx::OnnxModel>> {
        self.adopt_ready();
        self.onnx.load().get(id).cloned()
    }

    pub fn states(&self) -> BTreeMap<String, ModelState> {
        self.adopt_ready();
        self.states
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn state(&self, id: &str) -> Option<ModelState> {
        self.states().get(id).cloned()
    }

    /// Per loaded model: requests in a slot or waiting, slots, context.
    pub fn engines(&self) -> BTreeMap<String, serde_json::Value> {
        self.adopt_ready();
        self.engines
            .load()
            .iter()
            .map(|(id, e)| {
                (
                    id.clone(),
                    serde_json::json!({"load": e.load(), "slots": e.slots, "context": e.context, "queue": e.queue}),
                )
            })
            .chain(self.onnx.load().iter().map(|(id, m)| {
                (
                    id.clone(),
                    serde_json::json!({"load": m.load_now(), "workers": m.workers, "capacity": m.capacity()}),
                )
            }))
            .collect()
    }

    pub fn ready_count(&self) -> usize {
        self.adopt_ready();
        self.engines.load().len() + self.onnx.load().len()
    }

    /// Engines that finished loading since the last look join the map.
    fn adopt_ready(&self) {
        let ready: Vec<_> =
            std::mem::take(&mut *self.ready_tx.lock().unwrap_or_else(PoisonError::into_inner));
        if ready.is_empty() {
            return;
        }
        let wanted = self.wanted.lock().unwrap_or_else(PoisonError::into_inner);
        let mut map = (**self.engines.load()).clone();
        let mut onnx = (**self.onnx.load()).clone();
        for loaded in ready {
            // A model removed while it loaded is dropped here (its memory
            // is given back when the engine thread ends).
            match loaded {
                Loaded::Llm(id, engine) if wanted.contains_key(&id) => {
                    map.insert(id, engine);
                }
                Loaded::Onnx(id, model) if wanted.contains_key(&id) => {
                    onnx.insert(id, model);
                }
                _ => {}
            }
        }
        self.engines.store(Arc::new(map));
        self.onnx.store(Arc::new(onnx));
    }

    /// Brings the loaded set in line with `bundle`: loads what is new
    /// (each on its own thread), drops what is gone (requests in flight on
    /// it finish first: they hold the engine). `retry` also retries models
    /// that were refused (SIGHUP).
    pub fn reconcile(
        &self,
        bundle: &Bundle,
        config: &LlmConfig,
        onnx: &crate::config::OnnxConfig,
        models_dir: &Path,
        heartbeat: &Heartbeat,
        retry: bool,
    ) {
        self.adopt_ready();
        let mut wanted = self.wanted.lock().unwrap_or_else(PoisonError::into_inner);
        let desired: BTreeMap<String, (String, Files, Format)> = bundle
            .models
            .values()
            .map(|m| {
                let digests: String = m
                    .files
                    .iter()
                    .map(|f| crate::keys::hex(&f.sha256))
                    .collect();
                let files = m
                    .files
                    .iter()
                    .map(|f| (models_dir.join(&f.name), f.sha256, f.role.clone()))
                    .collect();
                (m.id.clone(), (digests, files, m.format))
            })
            .collect();
        let mut states = self.states.lock().unwrap_or_else(PoisonError::into_inner);
        // Gone, or changed: unload.
        let stale: Vec<String> = wanted
            .iter()
            .filter(|(id, digests)| desired.get(*id).is_none_or(|(d, _, _)| d != *digests))
            .map(|(id, _)| id.clone())
            .collect();
        if !stale.is_empty() {
            let mut map = (**self.engines.load()).clone();
            let mut onnx_map = (**self.onnx.load()).clone();
            for id in &stale {
                wanted.remove(id);
                states.remove(id);
                if map.remove(id).is_some() || onnx_map.remove(id).is_some() {
                    tracing::info!(model = %id, "model unloaded: no longer in the bundle (requests in flight finish first)");
                }
            }
            self.engines.store(Arc::new(map));
            self.onnx.store(Arc::new(onnx_map));
        }
        let mut tried = self.tried.lock().unwrap_or_else(PoisonError::into_inner);
        for (id, (digests, files, format)) in desired {
            let refused = matches!(states.get(&id), Some(ModelState::Refused { .. }));
            let stat: FileStat = files
                .iter()
                .map(|(p, _, _)| {
                    let m = std::fs::metadata(p).ok()?;
                    let mtime = m
                        .modified()
                        .ok()?
                        .duration_since(std::time::UNIX_EPOCH)
                        .ok()?;
                    Some((m.len(), i64::try_from(mtime.as_nanos()).unwrap_or(i64::MAX)))
                })
                .collect();
            let changed = tried.get(&id) != Some(&stat);
            if wanted.contains_key(&id) && !(refused && (retry || changed)) {
                continue;
            }
            tried.insert(id.clone(), stat);
            wanted.insert(id.clone(), digests);
            let total = files
                .iter()
                .map(|(p, _, _)| std::fs::metadata(p).map_or(0, |m| m.len()))
                .sum();
            states.insert(
                id.clone(),
                ModelState::Checking {
                    done_bytes: 0,
                    total_bytes: total,
                },
            );
            let loader = Loader {
                id: id.clone(),
                format,
                onnx: onnx.clone(),
                files,
                total_bytes: total,
                config: config.clone(),
                states: Arc::clone(&self.states),
                committed: Arc::clone(&self.committed),
                ready: Arc::clone(&self.ready_tx),
                worker: heartbeat.register(&format!("load-{id}"), Duration::from_secs(60)),
                heartbeat: heartbeat.clone(),
            };
            let spawned = std::thread::Builder::new()
                .name(format!("load-{id}"))
                .spawn(move || loader.run());
            if let Err(e) = spawned {
                states.insert(
                    id,
                    ModelState::Refused {
                        reason: format!("cannot start a loader thread: {e}"),
                    },
                );
            }
        }
    }
}

/// Loads one model on its own thread.
struct Loader {
    id: String,
    format: Format,
    onnx: crate::config::OnnxConfig,
    files: Files,
    /// The files' sizes when the load began, for progress.
    total_bytes: u64,
    config: LlmConfig,
    states: Arc<Mutex<BTreeMap<String, ModelState>>>,
    committed: Arc<Mutex<u64>>,
    ready: Arc<Mutex<Vec<Loaded>>>,
    worker: Worker,
    heartbeat: Heartbeat,
}

impl Loader {
    fn set(&self, state: ModelState) {
        let mut states = self.states.lock().unwrap_or_else(PoisonError::into_inner);
        // Only while the model is still wanted (a reconcile may have dropped it).
        if let Some(s) = states.get_mut(&self.id) {
            *s = state;
        }
    }

    fn run(self) {
        let id = self.id.clone();
        match self.load() {
            Ok(()) => {}
            Err(reason) => {
                tracing::error!(model = %id, reason = %reason, "model refused");
                self.set(ModelState::Refused { reason });
            }
        }
    }

    fn load(&self) -> Result<(), String> {
        let mut done = 0u64;
        for (path, expected, _) in &self.files {
            let digest = self.hash(path, &mut done, self.total_bytes)?;
            if &digest != expected {
                return Err(format!(
                    "{}: sha256 is {}, the bundle's manifest says {}; not loaded",
                    path.display(),
                    crate::keys::hex(&digest),
                    crate::keys::hex(expected)
                ));
            }
        }
        // The weights: the file whose role says so, else the first.
        let weights = self
            .files
            .iter()
            .find(|(_, _, role)| role == "weights")
            .or_else(|| self.files.first())
            .map(|(p, _, _)| p.clone())
            .ok_or("the manifest lists no file")?;
        if self.format == Format::Onnx {
            let tokenizer = self
                .files
                .iter()
                .find(|(_, _, role)| role == "tokenizer")
                .map(|(p, _, _)| p.clone());
            return self.load_onnx(&weights, tokenizer.as_deref(), done);
        }
        let kv = kv_cache_bytes(&weights, &self.config)?;
        // The bytes actually hashed are the files' sizes.
        let total = done;
        let need = total + kv;
        let release = self.charge(
            need,
            &format!(
                "weights {} MiB + KV cache {} MiB for {} slots x {} tokens",
                total >> 20,
                kv >> 20,
                self.config.slots,
                self.config.context
            ),
        )?;
        self.set(ModelState::Loading);
        self.worker.expect(Duration::from_secs(600));
        let backend = backend()?;
        let params = LlamaModelParams::default().with_use_mmap(true);
        let model = LlamaModel::load_from_file(backend, &weights, &params)
            .map_err(|e| format!("{}: llama.cpp could not load it: {e}", weights.display()))?;
        let model = Arc::new(model);
        // The model's own template; GGUF files converted without one get
        // llama.cpp's built-in template for their architecture family.
        let template = model.chat_template(None).ok().or_else(|| {
            let arch = model.meta_val_str("general.architecture").ok()?;
            let builtin = match arch.as_str() {
                a if a.starts_with("gemma") => "gemma",
                a if a.starts_with("qwen") => "chatml",
                "phi3" => "phi3",
                _ => return None,
            };
            tracing::info!(model = %self.id, architecture = %arch, template = builtin, "no chat template in the GGUF file: using llama.cpp's built-in one");
            LlamaChatTemplate::new(builtin).ok()
        });
        let (tx, rx) = mpsc::channel();
        let in_system = Arc::new(AtomicUsize::new(0));
        let slots = self.config.slots;
        let engine = Arc::new(Engine {
            id: self.id.clone(),
            model: Arc::clone(&model),
            template,
            jobs: Mutex::new(tx),
            in_system: Arc::clone(&in_system),
            capacity: (slots + self.config.queue) as usize,
            queue: self.config.queue as usize,
            slots,
            context: self.config.context,
            memory_bytes: need,
        });
        // The context is made on the engine thread (it borrows the model
        // there); wait for it, so a model is ready only when it can serve.
        let (made_tx, made_rx) = mpsc::channel::<Result<(), String>>();
        let run = EngineRun {
            id: self.id.clone(),
            model,
            config: self.config.clone(),
            jobs: rx,
            in_system,
            worker: self
                .heartbeat
                .register(&format!("engine-{}", self.id), Duration::from_secs(30)),
            release,
        };
        std::thread::Builder::new()
            .name(format!("engine-{}", self.id))
            .spawn(move || run.run(&made_tx))
            .map_err(|e| format!("cannot start the engine thread: {e}"))?;
        made_rx
            .recv()
            .map_err(|_| "the engine thread ended before it was ready".to_owned())??;
        tracing::info!(
            model = %self.id,
            memory_mib = need >> 20,
            slots,
            context = self.config.context,
            "model ready"
        );
        self.set(ModelState::Ready {
            memory_bytes: need,
            slots,
            context: self.config.context,
        });
        self.ready
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Loaded::Llm(self.id.clone(), engine));
        self.worker.idle();
        Ok(())
    }

    /// Takes memory from the budget (refusing when it does not fit); the
    /// guard gives it back.
    fn charge(&self, need: u64, what: &str) -> Result<Release, String> {
        let budget = self.config.memory_budget.unwrap_or_else(default_budget);
        let mut committed = self
            .committed
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if *committed + need > budget {
            return Err(format!(
                "needs {} MiB ({what}); {} MiB of the {} MiB memory budget are free (llm.memory_budget)",
                need >> 20,
                budget.saturating_sub(*committed) >> 20,
                budget >> 20
            ));
        }
        *committed += need;
        Ok(Release {
            committed: Arc::clone(&self.committed),
            bytes: need,
        })
    }

    /// An ONNX model: tract reads, analyses and optimises it once.
    fn load_onnx(
        &self,
        path: &Path,
        tokenizer: Option<&Path>,
        file_bytes: u64,
    ) -> Result<(), String> {
        // tract holds the weights (copied out of the file) and the
        // optimised plan's packed copies: about twice the file.
        let need = file_bytes.saturating_mul(2);
        let release = self.charge(need, "an ONNX model: about twice its file")?;
        self.set(ModelState::Loading);
        self.worker.expect(Duration::from_secs(600));
        let mut model = crate::onnx::OnnxModel::load(
            &self.id,
            path,
            self.onnx.workers as usize,
            self.onnx.queue as usize,
            need,
            self.onnx.max_tensor_elements,
        )?;
        model.release = Some(Box::new(release));
        // Before the tokenizer: it is held to these.
        model.max_batch_tokens = self.onnx.max_batch_tokens;
        model.max_run_bytes = self.onnx.max_run_bytes;
        if let Some(t) = tokenizer {
            model.set_tokenizer(t)?;
        }
        tracing::info!(
            model = %self.id,
            memory_mib = need >> 20,
            inputs = model.inputs.len(),
            outputs = model.outputs.len(),
            workers = model.workers,
            "ONNX model ready"
        );
        self.set(ModelState::Ready {
            memory_bytes: need,
            slots: u32::try_from(model.workers).unwrap_or(u32::MAX),
            context: 0,
        });
        self.ready
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Loaded::Onnx(self.id.clone(), Arc::new(model)));
        self.worker.idle();
        Ok(())
    }

    /// sha256 of a file; progress for the watchdog and the status every 64 MiB.
    fn hash(&self, path: &Path, done: &mut u64, total: u64) -> Result<[u8; 32], String> {
        let mut file = std::fs::File::open(path).map_err(|e| {
            format!(
                "{}: {e} (put the file named by the bundle's manifest in models_dir)",
                path.display()
            )
        })?;
        let mut hasher = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut since_report = 0u64;
        loop {
            let n = file
                .read(&mut buf)
                .map_err(|e| format!("{}: read error: {e}", path.display()))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            *done += n as u64;
            since_report += n as u64;
            if since_report >= 64 << 20 {
                since_report = 0;
                self.worker.progress();
                self.set(ModelState::Checking {
                    done_bytes: *done,
                    total_bytes: total,
                });
            }
        }
        Ok(hasher.finalize().into())
    }
}

/// Gives a model's memory back to the budget when its engine ends.
struct Release {
    committed: Arc<Mutex<u64>>,
    bytes: u64,
}

impl Drop for Release {
    fn drop(&mut self) {
        let mut c = self
            .committed
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *c = c.saturating_sub(self.bytes);
    }
}

/// 80% of the host's memory.
fn default_budget() -> u64 {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(u64::MAX / 2, |kb| kb * 1024);
    total / 5 * 4
}

/// The KV cache a model needs for `slots x context` tokens (f16 keys and
/// values), from the GGUF header alone.
fn kv_cache_bytes(path: &Path, config: &LlmConfig) -> Result<u64, String> {
    use llama_cpp_2::gguf::GgufContext;
    let gguf = GgufContext::from_file(path)
        .ok_or_else(|| format!("{}: not a readable GGUF file", path.display()))?;
    let string = |key: &str| {
        let i = gguf.find_key(key);
        (i >= 0)
            .then(|| gguf.val_str(i).map(str::to_owned))
            .flatten()
    };
    let number = |key: &str| -> Option<u64> {
        let i = gguf.find_key(key);
        if i < 0 {
            return None;
        }
        // The reader aborts on a type mismatch: look before reading.
        // GGUF value types (ggml/include/gguf.h): 4 UINT32, 5 INT32, 10 UINT64.
        match gguf.kv_type(i) {
            4 => Some(u64::from(gguf.val_u32(i))),
            5 => u64::try_from(gguf.val_i32(i)).ok(),
            10 => Some(gguf.val_u64(i)),
            _ => None,
        }
    };
    let arch = string("general.architecture")
        .ok_or_else(|| format!("{}: no general.architecture", path.display()))?;
    let key = |k: &str| format!("{arch}.{k}");
    let layers = number(&key("block_count")).ok_or("no block_count in the GGUF header")?;
    let embd = number(&key("embedding_length")).ok_or("no embedding_length in the GGUF header")?;
    let heads = number(&key("attention.head_count"))
        .filter(|h| *h > 0)
        .ok_or("no attention.head_count in the GGUF header")?;
    let heads_kv = number(&key("attention.head_count_kv")).unwrap_or(heads);
    let k_len = number(&key("attention.key_length")).unwrap_or(embd / heads);
    let v_len = number(&key("attention.value_length")).unwrap_or(embd / heads);
    let tokens = u64::from(config.slots) * u64::from(config.context);
    Ok(layers * tokens * heads_kv * (k_len + v_len) * 2)
}

/// The engine thread's state.
struct EngineRun {
    id: String,
    model: Arc<LlamaModel>,
    config: LlmConfig,
    jobs: mpsc::Receiver<Job>,
    in_system: Arc<AtomicUsize>,
    worker: Worker,
    #[allow(
        dead_code,
        reason = "held for its Drop: the memory goes back when the engine ends"
    )]
    release: Release,
}

/// A sequence in a slot.
struct Active {
    seq: i32,
    job: Job,
    sampler: LlamaSampler,
    /// Prompt tokens decoded so far (or kept from the slot's cache).
    fed: usize,
    /// Every token whose KV is in the cache, in order.
    history: Vec<LlamaToken>,
    /// Prompt tokens kept from the slot's cache.
    cached: u32,
    /// Position of the next token in the sequence.
    pos: i32,
    /// The last sampled token, to decode in the next step.
    next: Option<LlamaToken>,
    /// Index of this sequence's logits in the batch just decoded.
    logits: Option<i32>,
    generated: u32,
    /// Bytes of a UTF-8 character not complete yet.
    bytes: Vec<u8>,
    /// Text held back because it may be the start of a stop sequence.
    held: String,
}

impl EngineRun {
    fn run(self, made: &mpsc::Sender<Result<(), String>>) {
        let threads = match self.config.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n as usize,
        };
        let threads = i32::try_from(threads).unwrap_or(1);
        let slots = self.config.slots;
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(slots * self.config.context))
            .with_n_seq_max(slots)
            .with_n_batch(self.config.batch)
            .with_n_ubatch(self.config.batch)
            .with_n_threads(threads)
            .with_n_threads_batch(threads);
        let backend = match backend() {
            Ok(b) => b,
            Err(e) => {
                let _ = made.send(Err(e));
                return;
            }
        };
        let mut ctx = match self.model.new_context(backend, params) {
            Ok(c) => c,
            Err(e) => {
                let _ = made.send(Err(format!("llama.cpp could not make a context: {e}")));
                return;
            }
        };
        let _ = made.send(Ok(()));
        let vocab = self.model.vocab();
        let mut batch = LlamaBatch::new(self.config.batch as usize, 1);
        let mut free: Vec<i32> = (0..i32::try_from(slots).unwrap_or(1)).rev().collect();
        // What each slot's KV cache holds once its sequence is done.
        let mut cache: Vec<SlotCache> = (0..slots).map(|_| SlotCache::default()).collect();
        let mut active: Vec<Active> = Vec::new();
        let mut waiting = Waiting::new();
        let mut closed = false;
        let ctx_limit = i32::try_from(self.config.context).unwrap_or(i32::MAX);
        loop {
            // Take new jobs: block when there is nothing to do.
            if active.is_empty() && waiting.values().all(VecDeque::is_empty) {
                if closed {
                    break;
                }
                self.worker.idle();
                match self.jobs.recv_timeout(Duration::from_secs(1)) {
                    Ok(job) => enqueue(&mut waiting, job),
                    Err(mpsc::RecvTimeoutError::Timeout) => continue,
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        closed = true;
                        continue;
                    }
                }
            }
            loop {
                match self.jobs.try_recv() {
                    Ok(job) => enqueue(&mut waiting, job),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        closed = true;
                        break;
                    }
                }
            }
            self.worker.progress();
            // Waiting jobs whose client went away are dropped.
            for queue in waiting.values_mut() {
                queue.retain(|(_, job)| {
                    let gone = job.out.is_closed();
                    if gone {
                        self.in_system.fetch_sub(1, Ordering::AcqRel);
                    }
                    !gone
                });
            }
            // Free slots: to the tenant holding the fewest, then the oldest waiting.
            while !free.is_empty() {
                let pick = waiting
                    .iter()
                    .filter_map(|(tenant, q)| q.front().map(|(t, _)| (tenant, *t)))
                    .min_by_key(|(tenant, queued)| {
                        let holding = active.iter().filter(|a| &a.job.tenant == *tenant).count();
                        (holding, *queued)
                    })
                    .map(|(tenant, _)| tenant.clone());
                let Some(tenant) = pick else { break };
                let Some((_, job)) = waiting.get_mut(&tenant).and_then(VecDeque::pop_front) else {
                    break;
                };
                // The free slot whose cached tokens share the longest prefix
                // with this prompt, among those last used by the same tenant
                // (a prefix hit across tenants would be a timing side channel).
                let (at, reuse) = free
                    .iter()
                    .enumerate()
                    .map(|(i, seq)| {
                        let c = &cache[*seq as usize];
                        let lcp = if self.config.prompt_cache
                            && c.tenant.as_deref() == Some(job.tenant.as_str())
                        {
                            common_prefix(&c.tokens, &job.prompt)
                        } else {
                            0
                        };
                        (i, lcp)
                    })
                    .max_by_key(|(_, lcp)| *lcp)
                    .unwrap_or((free.len() - 1, 0));
                let seq = free.swap_remove(at);
                let sampler = match make_sampler(&self.model, &job.sampling) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = job.out.send(Out::Failed(e));
                        self.in_system.fetch_sub(1, Ordering::AcqRel);
                        free.push(seq);
                        continue;
                    }
                };
                // Keep the shared prefix (at least the last prompt token is
                // decoded again, for its logits); a sliding-window cache that
                // already dropped early positions cannot be cut: start over.
                let mut keep = reuse.min(job.prompt.len().saturating_sub(1));
                if keep > 0 && ctx.kv_cache_seq_pos_min(seq) > 0 {
                    keep = 0;
                }
                let cut = u32::try_from(keep).ok();
                if keep == 0 || ctx.kv_cache_seq_rm(seq, cut, None).is_err() {
                    keep = 0;
                    let _ = ctx.clear_kv_cache_seq(Some(seq.unsigned_abs()), None, None);
                }
                cache[seq as usize] = SlotCache::default();
                let _ = job.out.send(Out::Started);
                let history = job.prompt[..keep].to_vec();
                active.push(Active {
                    seq,
                    job,
                    sampler,
                    fed: keep,
                    cached: u32::try_from(keep).unwrap_or(0),
                    pos: i32::try_from(keep).unwrap_or(0),
                    history,
                    next: None,
                    logits: None,
                    generated: 0,
                    bytes: Vec::new(),
                    held: String::new(),
                });
            }
            waiting.retain(|_, q| !q.is_empty());
            if active.is_empty() {
                continue;
            }

            // One batch: the next token of every generating sequence, then
            // prompt chunks in the room left.
            batch.clear();
            let room = self.config.batch as usize;
            for a in &mut active {
                a.logits = None;
                if let Some(t) = a.next.take()
                    && batch.add(t, a.pos, &[a.seq], true).is_ok()
                {
                    a.logits = Some(batch.n_tokens() - 1);
                    a.pos += 1;
                    a.history.push(t);
                }
            }
            for a in &mut active {
                if a.fed >= a.job.prompt.len() {
                    continue;
                }
                let left = room.saturating_sub(usize::try_from(batch.n_tokens()).unwrap_or(room));
                if left == 0 {
                    break;
                }
                let end = (a.fed + left).min(a.job.prompt.len());
                for i in a.fed..end {
                    let last = i + 1 == a.job.prompt.len();
                    if batch.add(a.job.prompt[i], a.pos, &[a.seq], last).is_err() {
                        break;
                    }
                    a.pos += 1;
                    a.fed = i + 1;
                    a.history.push(a.job.prompt[i]);
                    if last {
                        a.logits = Some(batch.n_tokens() - 1);
                    }
                }
            }
            if batch.n_tokens() == 0 {
                continue;
            }
            if let Err(e) = ctx.decode(&mut batch) {
                // Nothing of this step is usable: fail every sequence in it.
                tracing::error!(model = %self.id, error = %e, "decode failed");
                for a in active.drain(..) {
                    let _ = a.job.out.send(Out::Failed(format!("decoding failed: {e}")));
                    let _ = ctx.clear_kv_cache_seq(Some(a.seq.unsigned_abs()), None, None);
                    cache[a.seq as usize] = SlotCache::default();
                    free.push(a.seq);
                    self.in_system.fetch_sub(1, Ordering::AcqRel);
                }
                continue;
            }
            self.worker.progress();

            // Sample, emit, finish.
            let mut finished = Vec::new();
            for (i, a) in active.iter_mut().enumerate() {
                if a.job.out.is_closed() {
                    finished.push((i, End::Cancelled));
                    continue;
                }
                let Some(idx) = a.logits else { continue };
                let token = a.sampler.sample(&ctx, idx);
                if vocab.is_eog(token) {
                    finished.push((i, End::Eog));
                    continue;
                }
                a.generated += 1;
                a.bytes
                    .extend_from_slice(&vocab.token_to_piece(token, false, None));
                let text = take_utf8(&mut a.bytes);
                if emit(a, &text) {
                    finished.push((i, End::StopSequence));
                    continue;
                }
                if a.generated >= a.job.max_tokens || a.pos + 1 >= ctx_limit {
                    finished.push((i, End::Length));
                    continue;
                }
                a.next = Some(token);
            }
            for (i, end) in finished.into_iter().rev() {
                let mut a = active.swap_remove(i);
                let reason = match end {
                    End::Cancelled => None,
                    End::StopSequence => Some(FinishReason::Stop),
                    End::Eog | End::Length => {
                        // Text held back for a stop sequence that never came
                        // is output after all.
                        let rest = std::mem::take(&mut a.held) + &String::from_utf8_lossy(&a.bytes);
                        if !rest.is_empty() {
                            let _ = a.job.out.send(Out::Text(rest, a.generated));
                        }
                        Some(if end == End::Eog {
                            FinishReason::Stop
                        } else {
                            FinishReason::Length
                        })
                    }
                };
                if let Some(reason) = reason {
                    let _ = a.job.out.send(Out::Done(Finish {
                        reason,
                        prompt_tokens: u32::try_from(a.job.prompt.len()).unwrap_or(u32::MAX),
                        completion_tokens: a.generated,
                        cached_tokens: a.cached,
                    }));
                }
                // The KV cache stays: the next prompt of this tenant that
                // shares its start skips decoding that part again.
                cache[a.seq as usize] = SlotCache {
                    tenant: Some(a.job.tenant.clone()),
                    tokens: std::mem::take(&mut a.history),
                };
                free.push(a.seq);
                self.in_system.fetch_sub(1, Ordering::AcqRel);
            }
        }
        tracing::info!(model = %self.id, "engine stopped");
    }
}

/// Jobs waiting for a slot, per tenant, with when they arrived.
type Waiting = BTreeMap<String, VecDeque<(Instant, Job)>>;

fn enqueue(waiting: &mut Waiting, job: Job) {
    waiting
        .entry(job.tenant.clone())
        .or_default()
        .push_back((Instant::now(), job));
}

/// What a free slot's KV cache holds, and for whom.
#[derive(Default)]
struct SlotCache {
    tenant: Option<String>,
    tokens: Vec<LlamaToken>,
}

fn common_prefix(a: &[LlamaToken], b: &[LlamaToken]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Why a sequence left its slot.
#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    Eog,
    StopSequence,
    Length,
    Cancelled,
}

/// The complete UTF-8 characters at the front of `bytes` (invalid bytes
/// become U+FFFD); an incomplete character at the end stays for the next token.
fn take_utf8(bytes: &mut Vec<u8>) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => {
            let s = s.to_owned();
            bytes.clear();
            s
        }
        Err(e) if e.error_len().is_none() => {
            let valid = e.valid_up_to();
            let s = String::from_utf8_lossy(&bytes[..valid]).into_owned();
            bytes.drain(..valid);
            s
        }
        Err(_) => {
            let s = String::from_utf8_lossy(bytes).into_owned();
            bytes.clear();
            s
        }
    }
}

/// Sends `text`, holding back any tail that may begin a stop sequence.
/// Returns true when a stop sequence completes (the text before it is sent).
fn emit(a: &mut Active, text: &str) -> bool {
    if a.job.stop.is_empty() {
        if !text.is_empty() {
            let _ = a.job.out.send(Out::Text(text.to_owned(), a.generated));
        }
        return false;
    }
    a.held.push_str(text);
    if let Some(at) = a
        .job
        .stop
        .iter()
        .filter_map(|s| a.held.find(s.as_str()))
        .min()
    {
        let before = a.held[..at].to_owned();
        a.held.clear();
        if !before.is_empty() {
            let _ = a.job.out.send(Out::Text(before, a.generated));
        }
        return true;
    }
    // The longest tail of `held` that is a proper prefix of a stop sequence.
    let keep = a
        .job
        .stop
        .iter()
        .flat_map(|s| {
            let held = &a.held;
            (1..s.len().min(held.len() + 1))
                .rev()
                .filter(|n| s.is_char_boundary(*n) && held.ends_with(&s[..*n]))
                .take(1)
        })
        .max()
        .unwrap_or(0);
    let cut = a.held.len() - keep;
    if cut > 0 {
        let out: String = a.held.drain(..cut).collect();
        let _ = a.job.out.send(Out::Text(out, a.generated));
    }
    false
}

fn make_sampler(model: &LlamaModel, s: &Sampling) -> Result<LlamaSampler, String> {
    let mut chain = Vec::new();
    if s.json_object {
        chain.push(
            LlamaSampler::grammar(model, JSON_OBJECT_GRAMMAR, "root")
                .map_err(|e| format!("the JSON grammar could not be built: {e}"))?,
        );
    }
    if s.ignore_eos {
        let vocab = model.vocab();
        let eog: Vec<LlamaLogitBias> = vocab
            .tokens()
            .filter(|t| vocab.is_eog(*t))
            .map(|t| LlamaLogitBias::new(t, f32::NEG_INFINITY))
            .collect();
        chain.push(LlamaSampler::logit_bias(model.n_vocab(), &eog));
    }
    if s.presence_penalty != 0.0 || s.frequency_penalty != 0.0 {
        chain.push(LlamaSampler::penalties(
            model.n_vocab(),
            64,
            1.0,
            s.frequency_penalty,
            s.presence_penalty,
        ));
    }
    if s.temperature <= 0.0 {
        chain.push(LlamaSampler::greedy());
    } else {
        if s.top_k > 0 {
            chain.push(LlamaSampler::top_k(s.top_k));
        }
        if s.top_p < 1.0 {
            chain.push(LlamaSampler::top_p(s.top_p, 1));
        }
        chain.push(LlamaSampler::temp(s.temperature));
        chain.push(LlamaSampler::dist(s.seed));
    }
    Ok(LlamaSampler::chain_simple(chain))
}

#[cfg(test)]
mod tests;

//! `keel._keel`: the Rust core of the Python package. Thin by design: every decision is made
//! by the same library code `keel train`, `keel init` and `keel check` run (the guard's
//! `monitor`, `init`, `init::audit`, `probe`); this file only converts values. Structured
//! results cross the boundary as JSON strings (small, and no conversion code to get wrong);
//! the per-step path (`Guard.observe`) takes and returns plain scalars.

use keel::config::{from_json_strict, ConfigError, ModelConfig};
use keel::init::{InitSection, TensorPlan};
use keel::monitor::{Action, Guard as CoreGuard, GuardConfig, GuardSnapshot, StepMetrics};
use keel::train::{event_line, JsonlWriter};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyByteArray;
use std::path::Path;

fn value_err(e: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(e.to_string())
}

fn runtime_err(e: impl std::fmt::Display) -> PyErr {
    PyRuntimeError::new_err(format!("{e:#}"))
}

fn parse_json(what: &str, s: &str) -> PyResult<serde_json::Value> {
    serde_json::from_str(s).map_err(|e| value_err(format!("{what}: not valid JSON: {e}")))
}

fn to_json<T: serde::Serialize>(v: &T) -> PyResult<String> {
    serde_json::to_string(v).map_err(runtime_err)
}

fn guard_config(json: &str) -> PyResult<GuardConfig> {
    let cfg: GuardConfig = from_json_strict("guard", &parse_json("guard config", json)?)
        .map_err(|e: ConfigError| value_err(e))?;
    cfg.validate()
        .map_err(|(k, why)| value_err(format!("{k}: {why}")))?;
    Ok(cfg)
}

/// Action codes of `Guard.observe`, most severe last (the Python side names them).
const PROCEED: u8 = 0;
const SKIP: u8 = 1;
const LR_BACKOFF: u8 = 2;
const ROLLBACK: u8 = 3;
const GIVE_UP: u8 = 4;

/// The guard of `keel train`: detectors and escalating policy, with events appended to an
/// events.jsonl in keel's format.
#[pyclass(module = "keel._keel")]
struct Guard {
    core: CoreGuard,
    events: Option<JsonlWriter>,
}

impl Guard {
    fn write(&mut self, line: serde_json::Value) -> PyResult<()> {
        if let Some(w) = &mut self.events {
            w.write(&line).map_err(runtime_err)?;
        }
        Ok(())
    }
}

#[pymethods]
impl Guard {
    /// `config_json`: the `[guard]` keys to set (JSON object); `events`: events.jsonl to
    /// append to, or None.
    #[new]
    #[pyo3(signature = (config_json, events=None))]
    fn new(config_json: &str, events: Option<&str>) -> PyResult<Self> {
        let cfg = guard_config(config_json)?;
        let events = match events {
            Some(p) => {
                let p = Path::new(p);
                if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| value_err(format!("{}: cannot create: {e}", dir.display())))?;
                }
                Some(JsonlWriter::open(p).map_err(value_err)?)
            }
            None => None,
        };
        Ok(Guard {
            core: CoreGuard::new(cfg),
            events,
        })
    }

    /// One step: (action code, skip, LR factor in force, rollback `before_step`, diagnosis,
    /// the events written as a JSON list or None). NaN/inf are data, never an error.
    /// `lr`: the step's scheduled LR (the early rule follows its rises); `scaler_skips`: set
    /// on a step a GradScaler skipped, how many in a row.
    #[pyo3(signature = (step, loss, grad_norm=None, max_attn_logit=None, logit_z=None, lr=None, scaler_skips=None))]
    #[allow(clippy::type_complexity, clippy::too_many_arguments)]
    fn observe(
        &mut self,
        step: u64,
        loss: f64,
        grad_norm: Option<f64>,
        max_attn_logit: Option<f64>,
        logit_z: Option<f64>,
        lr: Option<f64>,
        scaler_skips: Option<u64>,
    ) -> PyResult<(u8, bool, f64, Option<u64>, Option<String>, Option<String>)> {
        let mut lines = Vec::new();
        if let Some(a) = self.core.begin_step(step) {
            let (kind, detail) = a.event();
            lines.push(event_line(step, kind, detail));
        }
        let m = StepMetrics {
            step,
            loss,
            grad_norm,
            max_attn_logit,
            logit_z,
            lr,
            scaler_skips,
        };
        let (detections, decision) = self.core.observe(&m);
        for d in &detections {
            lines.push(event_line(step, d.kind.event_kind(), to_value(d)?));
        }
        let mut code = if decision.skip { SKIP } else { PROCEED };
        let (mut before, mut diagnosis) = (None, None);
        for a in &decision.actions {
            let (kind, detail) = a.event();
            lines.push(event_line(step, kind, detail));
            let c = match a {
                Action::Skip
                | Action::LrRestore
                | Action::EarlyRuleOff { .. }
                | Action::BadBatch { .. } => code,
                Action::LrBackoff { .. } | Action::LrCap { .. } => LR_BACKOFF,
                Action::Rollback { before_step } => {
                    before = Some(*before_step);
                    ROLLBACK
                }
                Action::GiveUp { diagnosis: d } => {
                    diagnosis = Some(d.clone());
                    GIVE_UP
                }
            };
            code = code.max(c);
        }
        let events = if lines.is_empty() {
            None
        } else {
            for l in &lines {
                self.write(l.clone())?;
            }
            Some(to_json(&lines)?)
        };
        Ok((
            code,
            decision.skip || code >= ROLLBACK,
            self.core.lr_factor(),
            before,
            diagnosis,
            events,
        ))
    }

    /// A resume at `step`: drop the events file's lines of later steps (the resumed run logs
    /// them again), atomically, and append after what is kept.
    fn truncate_events_after(&mut self, step: u64) -> PyResult<()> {
        if let Some(w) = self.events.take() {
            let path = w.path().to_path_buf();
            drop(w);
            keel::train::truncate_after_step(&path, step).map_err(runtime_err)?;
            self.events = Some(JsonlWriter::open(&path).map_err(value_err)?);
        }
        Ok(())
    }

    /// Append one event line of the caller's (e.g. what a rollback restored).
    fn log_event(&mut self, step: u64, kind: &str, detail_json: &str) -> PyResult<()> {
        let detail = parse_json("event detail", detail_json)?;
        self.write(event_line(step, kind, detail))
    }

    /// After a rollback: the detector windows of the restored state (`state_json()` taken
    /// with the snapshot); the policy's state carries on.
    fn restore_detectors_json(&mut self, s: &str) -> PyResult<()> {
        let snap: GuardSnapshot = serde_json::from_str(s).map_err(|e| {
            value_err(format!(
                "guard state: {e}; fix: pass what state_json() returned"
            ))
        })?;
        self.core.restore_detectors(snap.monitor);
        Ok(())
    }

    /// LR multiplier in force (1 when the guard only watches).
    #[getter]
    fn lr_factor(&self) -> f64 {
        self.core.lr_factor()
    }

    /// The last step of the early rule's window (from the start, the last rollback or the
    /// LR's last rise): the probes measure every step up to it.
    #[getter]
    fn early_until(&self) -> u64 {
        self.core.policy.early_until()
    }

    /// Whether an incident is open (snapshots wait for a quiet step).
    #[getter]
    fn in_incident(&self) -> bool {
        self.core.in_incident()
    }

    #[getter]
    fn enabled(&self) -> bool {
        self.core.enabled()
    }

    /// The resolved `[guard]` configuration as JSON.
    fn config_json(&self) -> PyResult<String> {
        to_json(&self.core.monitor.cfg)
    }

    /// Detector windows and policy state as JSON (the `guard` of a keel checkpoint's
    /// state.json has the same form).
    fn state_json(&self) -> PyResult<String> {
        to_json(&self.core.snapshot())
    }

    fn load_state_json(&mut self, s: &str) -> PyResult<()> {
        let snap: GuardSnapshot = serde_json::from_str(s).map_err(|e| {
            value_err(format!(
                "guard state: {e}; fix: pass what state_dict() returned"
            ))
        })?;
        self.core = CoreGuard::with_snapshot(self.core.monitor.cfg.clone(), snap);
        Ok(())
    }
}

fn to_value<T: serde::Serialize>(v: &T) -> PyResult<serde_json::Value> {
    serde_json::to_value(v).map_err(runtime_err)
}

/// The `[guard]` defaults as JSON (the valid keys).
#[pyfunction]
fn guard_defaults() -> PyResult<String> {
    to_json(&GuardConfig::default())
}

/// The `[init]` defaults as JSON (the valid keys).
#[pyfunction]
fn init_defaults() -> PyResult<String> {
    to_json(&InitSection::default())
}

fn model_config(config_json: &str) -> PyResult<ModelConfig> {
    let v = parse_json("model config", config_json)?;
    let cfg = match v.as_str() {
        Some(preset) => ModelConfig::preset(preset),
        None => ModelConfig::from_hf_value(&v),
    };
    cfg.map_err(value_err)
}

fn init_section(init_json: &str) -> PyResult<InitSection> {
    keel::init::section_from_json(&parse_json("init settings", init_json)?).map_err(value_err)
}

/// One scheme's plan for one model shape: what `keel init --explain` prints, the values
/// `keel init` writes (tensor by tensor), and the audit of live weights against it.
#[pyclass(module = "keel._keel")]
struct InitPlan {
    cfg: ModelConfig,
    ic: InitSection,
    plans: Vec<TensorPlan>,
}

impl InitPlan {
    fn find(&self, name: &str) -> PyResult<&TensorPlan> {
        self.plans.iter().find(|p| p.name == name).ok_or_else(|| {
            value_err(format!(
                "{name}: not a tensor of this Llama config; keel knows: {}",
                self.names().join(", ")
            ))
        })
    }
}

#[pymethods]
impl InitPlan {
    /// `config_json`: an HF config dict or a preset name (JSON string); `init_json`: `[init]` keys.
    #[new]
    fn new(config_json: &str, init_json: &str) -> PyResult<Self> {
        let cfg = model_config(config_json)?;
        let ic = init_section(init_json)?;
        let (cfg, plans) = keel::init::explain(&cfg, &ic).map_err(value_err)?;
        Ok(InitPlan { cfg, ic, plans })
    }

    /// Tensor names in keel's (HF) order.
    fn names(&self) -> Vec<String> {
        self.plans.iter().map(|p| p.name.clone()).collect()
    }

    fn shape(&self, name: &str) -> PyResult<Vec<usize>> {
        Ok(self.find(name)?.shape.clone())
    }

    /// Every tensor's plan (role, shape, fans, distribution, target σ, formula, depth
    /// scaling) and the model variant the scheme implies, as JSON.
    fn explain_json(&self) -> PyResult<String> {
        let n = self.cfg.num_params();
        to_json(&serde_json::json!({
            "scheme": self.ic.scheme,
            "seed": self.ic.seed,
            "params": n,
            "attn_scale": self.cfg.attn_scale,
            "logit_scale": self.cfg.logit_scale,
            "residual_scale": self.cfg.residual_scale,
            "config": self.cfg.to_hf_value(),
            "tensors": self.plans,
        }))
    }

    /// The f32 values of one tensor (little-endian bytes, row-major), exactly as
    /// `keel init` writes them: the same stream of (seed, name) and the same sampler.
    fn sample<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyByteArray>> {
        let p = self.find(name)?;
        let n: usize = p.shape.iter().product();
        let mut out = vec![0f32; n];
        py.detach(|| {
            keel::init::sample(&mut out, p.dist, self.ic.seed, &p.name, p.fan_out, p.fan_in)
        });
        let bytes: Vec<u8> = out.iter().flat_map(|x| x.to_le_bytes()).collect();
        Ok(PyByteArray::new(py, &bytes))
    }

    /// Audit one tensor's values (f32 little-endian bytes) against its plan, as JSON (the
    /// row `keel check --model --json` prints).
    fn audit(&self, py: Python<'_>, name: &str, data: &[u8]) -> PyResult<String> {
        let p = self.find(name)?;
        let n: usize = p.shape.iter().product();
        if data.len() != 4 * n {
            return Err(value_err(format!(
                "{name}: {} values, but its shape {:?} holds {n}",
                data.len() / 4,
                p.shape
            )));
        }
        let w: Vec<f32> = data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let a = py.detach(|| keel::init::audit::audit_tensor(p, &w));
        to_json(&a)
    }
}

/// `keel check` for a config and scheme: theory vs a measured forward/backward at init,
/// the first optimizer steps and the gates, as JSON (what `keel check --json` prints).
#[pyfunction]
#[pyo3(signature = (config_json, init_json, options_json))]
fn check(
    py: Python<'_>,
    config_json: &str,
    init_json: &str,
    options_json: &str,
) -> PyResult<String> {
    let ic = init_section(init_json)?;
    let mut cfg = model_config(config_json)?;
    keel::init::implied_model(&mut cfg, &ic);
    cfg.validate().map_err(value_err)?;
    let o = parse_json("check options", options_json)?;
    let obj = o.as_object().cloned().unwrap_or_default();
    let mut opts = keel::probe::CheckOptions::default();
    for (k, v) in &obj {
        let bad = || {
            value_err(format!(
                "check option {k}: expected a positive number, got {v}"
            ))
        };
        let int = || {
            v.as_u64()
                .filter(|&x| x > 0)
                .map(|x| x as usize)
                .ok_or_else(bad)
        };
        match k.as_str() {
            "batch" => opts.batch = int()?,
            "seq" => opts.seq = int()?.max(2),
            "steps" => opts.steps = int()?,
            "seed" => opts.seed = v.as_u64().ok_or_else(bad)?,
            "proxy_width" => opts.proxy_width = int()?.max(16),
            "lr" => {
                opts.optim.lr = v
                    .as_f64()
                    .filter(|x| x.is_finite() && *x > 0.0)
                    .ok_or_else(bad)?
            }
            _ => {
                return Err(value_err(format!(
                "unknown check option '{k}'; use one of: batch, seq, steps, seed, lr, proxy_width"
            )))
            }
        }
    }
    // The check runs on its own thread while this one waits with the GIL released, waking
    // every 50 ms to let Python handle signals: Ctrl-C raises KeyboardInterrupt at once and
    // tells the check to stop at its next pass.
    let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    opts.cancel = Some(cancel.clone());
    let h = std::thread::spawn(move || keel::probe::check(&cfg, &ic, &opts));
    while !h.is_finished() {
        py.detach(|| std::thread::sleep(std::time::Duration::from_millis(50)));
        if let Err(e) = py.check_signals() {
            cancel.store(true, std::sync::atomic::Ordering::SeqCst);
            return Err(e);
        }
    }
    let r = h
        .join()
        .map_err(|_| runtime_err("keel check panicked"))?
        .map_err(|e| {
            // a config that cannot be checked here (too big for the memory) is a bad value
            if e.downcast_ref::<ConfigError>().is_some() {
                value_err(format!("{e:#}"))
            } else {
                runtime_err(e)
            }
        })?;
    to_json(&r)
}

/// Worker threads of keel's kernels (0: one per core); call before the first check.
#[pyfunction]
fn set_threads(n: usize) {
    keel::kernels::init_threads(n);
}

#[pymodule]
fn _keel(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Guard>()?;
    m.add_class::<InitPlan>()?;
    m.add_function(wrap_pyfunction!(guard_defaults, m)?)?;
    m.add_function(wrap_pyfunction!(init_defaults, m)?)?;
    m.add_function(wrap_pyfunction!(check, m)?)?;
    m.add_function(wrap_pyfunction!(set_threads, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add(
        "ACTIONS",
        ["proceed", "skip", "lr_backoff", "rollback", "give_up"],
    )?;
    Ok(())
}

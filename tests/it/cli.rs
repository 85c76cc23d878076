//! The `kron-adapters` command-line tool: inspect, merge (against PEFT's merged weights, in the
//! base's dtype), convert round trips, exit codes, and no output on failure.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{peft_fixture, scratch_dir};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kron-adapters"))
}

fn tmp(name: &str) -> PathBuf {
    scratch_dir("cli", name)
}

fn run(args: &[&str]) -> (i32, String, String) {
    let out = bin().args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `kron-adapters merge --base BASE --adapter ADAPTER --out OUT`.
fn merge(base: &Path, adapter: &Path, out: &Path) -> (i32, String, String) {
    run(&[
        "merge",
        "--base",
        s(base),
        "--adapter",
        s(adapter),
        "--out",
        s(out),
    ])
}

/// The largest absolute difference between two checkpoints with the same tensors.
fn max_abs_diff(a: &Tensors, b: &Tensors) -> f32 {
    a.iter()
        .flat_map(|(k, (_, _, v))| v.iter().zip(&b[k].2).map(|(x, y)| (x - y).abs()))
        .fold(0.0, f32::max)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// name → (dtype, shape, values as f32)
type Tensors = std::collections::BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<f32>)>;

fn read(path: &Path) -> Tensors {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            let vals = kron_adapters::store::HostTensor::from_view("", &n, &v)
                .unwrap()
                .data;
            (n, (v.dtype(), v.shape().to_vec(), vals))
        })
        .collect()
}

#[test]
fn inspect_describes_peft_folders_and_adapter_files() {
    let (code, out, _) = run(&[
        "inspect",
        s(&peft_fixture("lokr_kronlora_d48").join("adapter")),
    ]);
    assert_eq!(code, 0);
    assert!(
        out.contains("PEFT LOKR folder") && out.contains("Kron-LoRA × 8"),
        "{out}"
    );
    assert!(
        out.contains("encoder.layer.1.output.dense") && out.contains("a 8×6, b1 12×2, b2 2×8"),
        "{out}"
    );
    assert!(out.contains("trainable parameters: 624"), "{out}");
    let (code, out, _) = run(&[
        "inspect",
        "--json",
        s(&peft_fixture("lora_d48").join("adapter")),
    ]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["trainable_params"], 3840);
    assert_eq!(
        v["layers"]["encoder.layer.0.attention.self.query"]["scale"],
        2.0
    );
    assert!(v["bytes"].as_u64().unwrap() > 15_000);
}

#[test]
fn merge_matches_peft_merge_and_unload() {
    let dir = tmp("merge");
    for case in [
        "lokr_kronlora_d48",
        "lokr_krona_full_d48",
        "lokr_both_d64",
        "lora_d48",
    ] {
        let out = dir.join(format!("{case}.safetensors"));
        let f = peft_fixture(case);
        let (code, _, err) = merge(&f.join("base.safetensors"), &f.join("adapter"), &out);
        assert_eq!(code, 0, "{err}");
        let (ours, theirs) = (read(&out), read(&f.join("merged.safetensors")));
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            theirs.keys().collect::<Vec<_>>(),
            "{case}: same names"
        );
        for (k, (dt, shape, v)) in &ours {
            assert_eq!((dt, shape), (&theirs[k].0, &theirs[k].1), "{case} {k}");
            let err = v
                .iter()
                .zip(&theirs[k].2)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(err <= 1e-5, "{case} {k}: max abs error {err}");
        }
    }
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn merge_keeps_the_base_dtype() {
    // An F16 copy of a base: the merged file is F16 too, with everything else copied as is.
    let dir = tmp("f16");
    let f = peft_fixture("lora_d48");
    let bytes = std::fs::read(f.join("base.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let owned: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            let vals = kron_adapters::store::HostTensor::from_view("", &n, &v)
                .unwrap()
                .data;
            (
                n,
                v.shape().to_vec(),
                vals.iter()
                    .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                    .collect(),
            )
        })
        .collect();
    let views: Vec<_> = owned
        .iter()
        .map(|(n, sh, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F16, sh.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), &dir.join("base16.safetensors")).unwrap();
    let out = dir.join("merged16.safetensors");
    let (code, _, err) = merge(&dir.join("base16.safetensors"), &f.join("adapter"), &out);
    assert_eq!(code, 0, "{err}");
    let merged = read(&out);
    let want = read(&f.join("merged.safetensors"));
    for (k, (dt, _, v)) in &merged {
        assert_eq!(*dt, safetensors::Dtype::F16, "{k}");
        let err = v
            .iter()
            .zip(&want[k].2)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(err <= 2e-3, "{k}: f16 rounding only, got {err}");
    }
    assert_eq!(
        merged["pooler.weight"].2,
        read(&dir.join("base16.safetensors"))["pooler.weight"].2,
        "untouched tensors copied"
    );
    let out_bytes = std::fs::read(&out).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&out_bytes).unwrap();
    assert_eq!(
        header.metadata().as_ref().unwrap()["format"],
        "pt",
        "metadata kept"
    );
    std::fs::remove_dir_all(dir).ok();
}

/// A merge that fails on the last adapted weight, after most of the file is written (the output
/// is streamed), leaves the existing output as it was and no temporary file.
#[test]
fn a_merge_failing_late_keeps_the_existing_output() {
    use kron_adapters::store::st;
    let dir = tmp("late");
    let f = peft_fixture("lora_d48");
    let (base, merged) = (
        read(&f.join("base.safetensors")),
        read(&f.join("merged.safetensors")),
    );
    let last = base
        .keys()
        .filter(|k| base[*k].2 != merged[*k].2)
        .max()
        .unwrap()
        .clone();
    assert!(
        base.keys().filter(|k| **k < last).count() > 5,
        "most tensors come first"
    );
    let entries: Vec<st::Entry> = base
        .iter()
        .map(|(k, (dt, shape, v))| {
            let mut v = v.clone();
            if *k == last {
                v[3] = f32::NAN;
            }
            (
                k.clone(),
                *dt,
                shape.clone(),
                st::encode_f32(&v, *dt).unwrap(),
            )
        })
        .collect();
    let bad = dir.join("bad.safetensors");
    std::fs::write(
        &bad,
        st::serialize("x", &entries, Default::default()).unwrap(),
    )
    .unwrap();
    let out = dir.join("out.safetensors");
    std::fs::write(&out, b"previous output").unwrap();
    let (code, _, err) = run(&[
        "merge",
        "--base",
        s(&bad),
        "--adapter",
        s(&f.join("adapter")),
        "--out",
        s(&out),
        "--force",
    ]);
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("NaN"), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), b"previous output");
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "no temporary file: {names:?}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn convert_round_trips_between_peft_and_adapter_files() {
    let dir = tmp("convert");
    let native = dir.join("a.safetensors");
    let (code, _, err) = run(&[
        "convert",
        "--from",
        "peft",
        "--to",
        "native",
        s(&peft_fixture("lokr_kronlora_d48").join("adapter")),
        s(&native),
    ]);
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = run(&["inspect", s(&native)]);
    assert!(
        code == 0 && out.contains("kron-adapters adapter file") && out.contains("Kron-LoRA × 8"),
        "{out}"
    );
    let peft = dir.join("peft");
    let (code, _, err) = run(&[
        "convert",
        "--from",
        "native",
        "--to",
        "peft",
        s(&native),
        s(&peft),
        "--base-model",
        "my/net",
    ]);
    assert_eq!(code, 0, "{err}");
    // Merging the converted folder gives PEFT's merged weights too.
    let f = peft_fixture("lokr_kronlora_d48");
    let out = dir.join("m.safetensors");
    let (code, _, err) = merge(&f.join("base.safetensors"), &peft, &out);
    assert_eq!(code, 0, "{err}");
    let (ours, theirs) = (read(&out), read(&f.join("merged.safetensors")));
    assert!(max_abs_diff(&ours, &theirs) <= 1e-5);
    // Existing outputs need --force.
    let (code, _, err) = run(&[
        "convert",
        "--from",
        "peft",
        "--to",
        "native",
        s(&peft_fixture("lora_d48").join("adapter")),
        s(&native),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--force"), "{err}");
    let (code, _, _) = run(&[
        "convert",
        "--from",
        "peft",
        "--to",
        "native",
        s(&peft_fixture("lora_d48").join("adapter")),
        s(&native),
        "--force",
    ]);
    assert_eq!(code, 0);
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn exit_codes_and_no_partial_outputs() {
    let dir = tmp("errors");
    let out = dir.join("out.safetensors");
    let base = peft_fixture("lora_d48").join("base.safetensors");
    let check = |args: Vec<&str>, want: i32, needle: &str| {
        let (code, _, err) = run(&args);
        assert_eq!(code, want, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!out.exists(), "{args:?} left an output file");
        let stray: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .collect();
        assert!(stray.is_empty(), "{args:?} left {stray:?}");
    };
    // 1: missing files.
    check(
        vec![
            "merge",
            "--base",
            s(&base),
            "--adapter",
            "/nonexistent",
            "--out",
            s(&out),
        ],
        1,
        "nonexistent",
    );
    // 3: malformed inputs.
    let bad = dir
        .parent()
        .unwrap()
        .join(format!("kron-cli-bad-{}", std::process::id()));
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("adapter_config.json"), b"{ not json").unwrap();
    std::fs::copy(
        peft_fixture("lora_d48").join("adapter/adapter_model.safetensors"),
        bad.join("adapter_model.safetensors"),
    )
    .unwrap();
    check(
        vec![
            "merge",
            "--base",
            s(&base),
            "--adapter",
            s(&bad),
            "--out",
            s(&out),
        ],
        3,
        "adapter_config.json",
    );
    std::fs::write(
        bad.join("adapter_config.json"),
        std::fs::read(peft_fixture("lora_d48").join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    std::fs::write(
        bad.join("adapter_model.safetensors"),
        b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":",
    )
    .unwrap();
    check(
        vec![
            "merge",
            "--base",
            s(&base),
            "--adapter",
            s(&bad),
            "--out",
            s(&out),
        ],
        3,
        "safetensors",
    );
    check(
        vec![
            "merge",
            "--base",
            s(&peft_fixture("lora_d48").join("adapter/adapter_config.json")),
            "--adapter",
            s(&peft_fixture("lora_d48").join("adapter")),
            "--out",
            s(&out),
        ],
        3,
        "safetensors",
    );
    // A device is no file: refused by name, not read until memory runs out.
    check(vec!["inspect", "/dev/zero"], 3, "not a regular file");
    check(
        vec![
            "merge",
            "--base",
            "/dev/zero",
            "--adapter",
            s(&peft_fixture("lora_d48").join("adapter")),
            "--out",
            s(&out),
        ],
        3,
        "not a regular file",
    );
    // Nor is a device, FIFO or socket an output: replacing one would remove the node (`--force`
    // onto /dev/null left a regular file there). A socket stands for them here.
    let sock_dir = tmp("errors-sock");
    let sock = sock_dir.join("out.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    check(
        vec![
            "quantize",
            "--bits",
            "8",
            "--force",
            s(&peft_fixture("lora_d48").join("adapter")),
            s(&sock),
        ],
        3,
        "not a regular file",
    );
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::symlink_metadata(&sock)
        .unwrap()
        .file_type()
        .is_socket());
    std::fs::remove_dir_all(sock_dir).ok();
    // 4: unsupported.
    let mut cfg: serde_json::Value = serde_json::from_slice(
        &std::fs::read(peft_fixture("lora_d48").join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    cfg["use_dora"] = true.into();
    std::fs::write(bad.join("adapter_config.json"), cfg.to_string()).unwrap();
    std::fs::copy(
        peft_fixture("lora_d48").join("adapter/adapter_model.safetensors"),
        bad.join("adapter_model.safetensors"),
    )
    .unwrap();
    check(vec!["inspect", s(&bad)], 4, "use_dora");
    // 5: adapter and base do not fit.
    check(
        vec![
            "merge",
            "--base",
            s(&base),
            "--adapter",
            s(&peft_fixture("lokr_both_d64").join("adapter")),
            "--out",
            s(&out),
        ],
        5,
        "[64, 64]",
    );
    check(
        vec![
            "merge",
            "--base",
            s(&base),
            "--adapter",
            s(&peft_fixture("lora_d48").join("adapter")),
            "--out",
            s(&out),
            "--map",
            "encoder.=bert.encoder.",
        ],
        5,
        "--map",
    );
    // 2: usage.
    let (code, _, _) = run(&["merge", "--base", s(&base)]);
    assert_eq!(code, 2);
    std::fs::remove_dir_all(bad).ok();
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn quantize_writes_a_file_that_inspect_merge_and_convert_accept() {
    let dir = tmp("quantize");
    let f = peft_fixture("lora_d48");
    let q = dir.join("q4.safetensors");
    let (code, _, err) = run(&[
        "quantize",
        "--bits",
        "4",
        "--level",
        "block:16",
        s(&f.join("adapter")),
        s(&q),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("int4 per block:16"), "{err}");
    let (code, out, _) = run(&["inspect", s(&q)]);
    assert!(
        code == 0 && out.contains("quantized adapter file (int4 per block:16)"),
        "{out}"
    );
    // Merging the quantized adapter adds its dequantized ΔW: close to PEFT's float merge.
    let merged = dir.join("m.safetensors");
    let (code, _, err) = merge(&f.join("base.safetensors"), &q, &merged);
    assert_eq!(code, 0, "{err}");
    let (ours, float) = (read(&merged), read(&f.join("merged.safetensors")));
    let dq = kron_adapters::NativeAdapters::read(&q).unwrap();
    let deq_merged = dir.join("dq.safetensors");
    dq.write(dir.join("dq-adapter.safetensors")).unwrap();
    let (code, _, _) = merge(
        &f.join("base.safetensors"),
        &dir.join("dq-adapter.safetensors"),
        &deq_merged,
    );
    assert_eq!(code, 0);
    assert_eq!(
        read(&deq_merged),
        ours,
        "the same as merging the dequantized adapter"
    );
    let worst = ours
        .iter()
        .map(|(k, v)| {
            v.2.iter()
                .zip(&float[k].2)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max)
        })
        .fold(0f32, f32::max);
    assert!(
        worst > 0.0 && worst < 0.05,
        "int4 changes the merge a little: {worst}"
    );
    // To a PEFT folder (dequantized factors).
    let (code, _, err) = run(&[
        "convert",
        "--from",
        "native",
        "--to",
        "peft",
        s(&q),
        s(&dir.join("peft")),
    ]);
    assert_eq!(code, 0, "{err}");
    // Bad schemes are usage errors (2: the arguments, not the input files), and leave nothing.
    let (code, _, err) = run(&[
        "quantize",
        "--bits",
        "5",
        s(&f.join("adapter")),
        s(&dir.join("x.safetensors")),
    ]);
    assert_eq!(code, 2, "{err}");
    let (code, _, _) = run(&[
        "quantize",
        "--bits",
        "8",
        "--level",
        "rows",
        s(&f.join("adapter")),
        s(&dir.join("x.safetensors")),
    ]);
    assert_eq!(code, 2);
    assert!(!dir.join("x.safetensors").exists());
    std::fs::remove_dir_all(dir).ok();
}

/// Every command refuses an adapter file with inconsistent metadata with exit code 3 (a typed
/// error, not a panic: 101) and writes nothing.
#[test]
fn inconsistent_adapter_metadata_exits_3_in_every_command() {
    use crate::checkpoint::{inconsistent_specs, with_edited_meta};
    let dir = tmp("inconsistent");
    let f = peft_fixture("lokr_kronlora_d48");
    let native = dir.join("good.safetensors");
    // One layer of the fixture as a lone-layer adapter file (path "").
    let read = kron_adapters::store::PeftAdapter::read_dir(f.join("adapter")).unwrap();
    let (name, spec) = read.adapters.meta.layers.iter().next().unwrap();
    let lone = kron_adapters::NativeAdapters {
        meta: kron_adapters::store::CheckpointMeta::new([(String::new(), spec.clone())]),
        factors: [(String::new(), read.adapters.factors[name].clone())].into(),
    };
    lone.write(&native).unwrap();
    let bytes = std::fs::read(&native).unwrap();
    let base = f.join("base.safetensors");
    for (what, edit) in inconsistent_specs() {
        let bad = dir.join("bad.safetensors");
        std::fs::write(&bad, with_edited_meta(&bytes, &edit)).unwrap();
        let out = dir.join("out");
        for args in [
            vec!["inspect", s(&bad)],
            vec![
                "merge",
                "--base",
                s(&base),
                "--adapter",
                s(&bad),
                "--out",
                s(&out),
            ],
            vec![
                "convert",
                "--from",
                "native",
                "--to",
                "peft",
                s(&bad),
                s(&out),
            ],
            vec![
                "convert",
                "--from",
                "native",
                "--to",
                "native",
                s(&bad),
                s(&out),
            ],
            vec!["quantize", "--bits", "4", s(&bad), s(&out)],
        ] {
            let (code, _, err) = run(&args);
            assert_eq!(code, 3, "{what}: {args:?}: {err}");
            assert!(!out.exists(), "{what}: {args:?} wrote {}", out.display());
        }
    }
    std::fs::remove_dir_all(dir).ok();
}

/// `generate`, `eval` and `export-hf` on the real SmolLM2 (asset; CI fetches it): the greedy
/// continuation is transformers' (tests/fixtures/smollm2/reference.json), only it is on stdout;
/// eval's last line is its JSON; errors have their exit codes. (The binary runs on the CPU
/// whatever the test backend.)
#[cfg(not(feature = "wgpu"))]
#[test]
fn decoder_commands_on_smollm2() {
    let Some(pkg) = crate::common::asset(&kron_adapters::finetune::assets::SMOLLM2) else {
        return;
    };
    let gguf = pkg.join(kron_adapters::finetune::assets::SMOLLM2.prefix);
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(crate::common::fixture("smollm2/reference.json")).unwrap(),
    )
    .unwrap();
    let case = &reference["greedy"]["cases"][0];
    // Twenty greedy tokens of the case's prompt with `model_args`: stdout and stderr.
    let greedy = |model_args: &[&str]| {
        let mut args = vec!["generate"];
        args.extend_from_slice(model_args);
        let prompt = case["prompt_text"].as_str().unwrap();
        args.extend(["--prompt", prompt, "--max-new-tokens", "20"]);
        let (code, out, err) = run(&args);
        assert_eq!(code, 0, "{err}");
        (out, err)
    };
    let (out, err) = greedy(&["--model", s(&gguf)]);
    assert_eq!(
        out,
        format!("{}\n", case["continuation_text"].as_str().unwrap()),
        "{err}"
    );
    assert!(err.contains("tokens/s"), "timing on stderr: {err}");
    // With a PEFT LoRA adapter: transformers + PEFT's continuation.
    let lora = &reference["adapters"]["lora"];
    let lora_dir = crate::common::fixture("smollm2/peft_lora");
    let (out, _) = greedy(&["--model", s(&gguf), "--adapter", s(&lora_dir)]);
    assert_eq!(
        out,
        format!("{}\n", lora["plain"]["continuation_text"].as_str().unwrap())
    );
    // --base-weights int8 (the frozen weights held in 8 bits): the same first sentence as
    // transformers' (plain and with the LoRA; rounding moves later tokens), said on stderr.
    for (adapter, want) in [
        (None, &case["continuation_text"]),
        (Some(&lora_dir), &lora["plain"]["continuation_text"]),
    ] {
        let prompt = case["prompt_text"].as_str().unwrap();
        let mut args = vec!["--model", s(&gguf), "--base-weights", "int8"];
        if let Some(a) = adapter {
            args.extend(["--adapter", s(a)]);
        }
        // Eight tokens: the crate's own code is unoptimized in test builds.
        args.extend(["--prompt", prompt, "--max-new-tokens", "8"]);
        let (code, out, err) = run(&[&["generate"], &args[..]].concat());
        assert_eq!(code, 0, "{err}");
        let sentence = want.as_str().unwrap().split('\n').next().unwrap();
        assert!(
            sentence.len() > 5 && out.starts_with(sentence),
            "{out:?}: {err}"
        );
        assert!(err.contains("int8 frozen weights"), "{err}");
    }
    // export-gguf: the adapter merged into an F32 GGUF that carries SmolLM2's tokenizer runs
    // without the adapter and continues as transformers + PEFT; an F16 one is about half the
    // size and runs.
    let dir = tmp("export-gguf-smollm2");
    let (f32_out, f16_out) = (dir.join("merged-f32.gguf"), dir.join("f16.gguf"));
    let (code, _, err) = run(&[
        "export-gguf",
        "--model",
        s(&gguf),
        "--adapter",
        s(&lora_dir),
        "--dtype",
        "f32",
        "--out",
        s(&f32_out),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("no GGUF tokenizer"), "{err}");
    let (out, _) = greedy(&["--model", s(&f32_out)]);
    assert_eq!(
        out,
        format!("{}\n", lora["plain"]["continuation_text"].as_str().unwrap())
    );
    let (code, _, err) = run(&["export-gguf", "--model", s(&gguf), "--out", s(&f16_out)]);
    assert_eq!(code, 0, "{err}");
    let size = |p: &Path| std::fs::metadata(p).unwrap().len() as f64;
    let ratio = size(&f16_out) / size(&f32_out);
    assert!((0.45..0.55).contains(&ratio), "F16/F32 size {ratio}");
    let (code, out, err) = run(&["generate", "--model", s(&f16_out), "--prompt", "Hi"]);
    assert!(code == 0 && !out.trim().is_empty(), "{err}");
    // Q8_0 (every SmolLM2 matrix has rows of whole blocks): about a quarter of F32 (34 bytes
    // per 32 values; the vectors stay F32), and it runs.
    let q8_out = dir.join("q8_0.gguf");
    let (code, _, err) = run(&[
        "export-gguf",
        "--model",
        s(&gguf),
        "--dtype",
        "q8_0",
        "--out",
        s(&q8_out),
    ]);
    assert_eq!(code, 0, "{err}");
    let ratio = size(&q8_out) / size(&f32_out);
    assert!((0.26..0.28).contains(&ratio), "Q8_0/F32 size {ratio}");
    let (code, out, err) = run(&["generate", "--model", s(&q8_out), "--prompt", "Hi"]);
    assert!(code == 0 && !out.trim().is_empty(), "{err}");
    std::fs::remove_dir_all(dir).ok();
    // eval: the last stdout line is one JSON object.
    let (code, out, err) = run(&[
        "eval",
        "--model",
        s(&gguf),
        "--task",
        "arc_easy",
        "--split",
        "test",
        "--limit",
        "12",
    ]);
    assert_eq!(code, 0, "{err}");
    let last: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(
        (
            last["task"].as_str(),
            last["split"].as_str(),
            last["n"].as_u64()
        ),
        (Some("arc_easy"), Some("test"), Some(12))
    );
    let acc = last["acc"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc) && last["acc_norm"].as_f64().is_some());
    // Errors: a missing model (1), bad arguments (2), an adapter made for another model (5).
    let (code, _, _) = run(&["generate", "--model", "/nonexistent.gguf", "--prompt", "x"]);
    assert_eq!(code, 1);
    let (code, _, err) = run(&["eval", "--model", s(&gguf), "--task", "mmlu"]);
    assert_eq!(code, 2, "{err}");
    // A zero temperature and an unknown --base-weights are usage errors.
    for [flag, value] in [["--temperature", "0"], ["--base-weights", "int4"]] {
        let args = [
            "generate",
            "--model",
            s(&gguf),
            "--prompt",
            "x",
            flag,
            value,
        ];
        let (code, _, err) = run(&args);
        assert_eq!(code, 2, "{flag} {value}: {err}");
    }
    let (code, _, err) = run(&[
        "eval",
        "--model",
        s(&gguf),
        "--task",
        "piqa",
        "--split",
        "test",
    ]);
    assert_eq!(code, 2, "{err}");
    let tiny_lora = crate::common::fixture("llama/tiny_llama/peft_lora");
    let (code, _, err) = run(&[
        "generate",
        "--model",
        s(&gguf),
        "--adapter",
        s(&tiny_lora),
        "--prompt",
        "x",
    ]);
    assert_eq!(code, 5, "{err}");
    let mut bad = std::fs::read(&gguf).unwrap();
    bad.truncate(5000);
    let dir = tmp("decoder");
    std::fs::write(dir.join("bad.gguf"), bad).unwrap();
    let (code, _, err) = run(&[
        "generate",
        "--model",
        s(&dir.join("bad.gguf")),
        "--prompt",
        "x",
    ]);
    assert_eq!(code, 3, "{err}");
    std::fs::remove_dir_all(dir).ok();
}

/// `export-hf` merges an adapter into a model and writes a Hugging Face folder that loads
/// back (here the tiny Llama fixture, which has no tokenizer: weights and config only).
#[test]
fn export_hf_writes_a_merged_folder() {
    let dir = tmp("export-hf");
    let out = dir.join("merged");
    let f = crate::common::fixture("llama/tiny_llama");
    let (code, _, err) = run(&[
        "export-hf",
        "--model",
        s(&f.join("tiny_llama.gguf")),
        "--adapter",
        s(&f.join("peft_lora")),
        "--out",
        s(&out),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.join("config.json").exists() && out.join("model.safetensors").exists());
    // The GGUF has no tokenizer metadata: generate needs one (4, unsupported), nothing written.
    let (code, out_text, err) = run(&[
        "generate",
        "--model",
        s(&f.join("tiny_llama.gguf")),
        "--prompt",
        "x",
    ]);
    assert_eq!(code, 4, "{err}");
    assert!(out_text.is_empty() && err.contains("no tokenizer"), "{err}");
    // The exported folder runs: export it again (no adapter), the weights are the same.
    let (code, _, err) = run(&[
        "export-hf",
        "--model",
        s(&out),
        "--out",
        s(&dir.join("again")),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        std::fs::read(dir.join("again/model.safetensors")).unwrap()
    );
    // An existing output is refused (1) without --force.
    let (code, _, _) = run(&[
        "export-hf",
        "--model",
        s(&out),
        "--out",
        s(&dir.join("again")),
    ]);
    assert_eq!(code, 1);
    // --dtype bf16: the dtype in config.json and the file; an unknown dtype is a usage error
    // (2), nothing written.
    let half = dir.join("bf16");
    let (code, _, err) = run(&[
        "export-hf",
        "--model",
        s(&out),
        "--dtype",
        "bf16",
        "--out",
        s(&half),
    ]);
    assert_eq!(code, 0, "{err}");
    let config = std::fs::read_to_string(half.join("config.json")).unwrap();
    assert!(config.contains("\"torch_dtype\": \"bfloat16\""), "{config}");
    let bytes = std::fs::read(half.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert!(st
        .tensors()
        .iter()
        .all(|(_, v)| v.dtype() == safetensors::Dtype::BF16));
    let (code, _, _) = run(&[
        "export-hf",
        "--model",
        s(&out),
        "--dtype",
        "q8_0",
        "--out",
        s(&dir.join("q8")),
    ]);
    assert_eq!(code, 2);
    assert!(!dir.join("q8").exists());
    // export-gguf from the exported folder: no tokenizer to carry (a note), an F32 file whose
    // weights are the folder's; existing outputs and unknown types are refused, nothing left.
    let gguf = dir.join("merged.gguf");
    let (code, _, err) = run(&[
        "export-gguf",
        "--model",
        s(&out),
        "--dtype",
        "f32",
        "--out",
        s(&gguf),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("no GGUF tokenizer"), "{err}");
    let file = kron_adapters::store::gguf::GgufFile::read(&gguf).unwrap();
    let st = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&st).unwrap();
    let v_proj: Vec<f32> = st
        .tensor("model.layers.1.self_attn.v_proj.weight")
        .unwrap()
        .data()
        .chunks(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert_eq!(file.dequantize("blk.1.attn_v.weight").unwrap(), v_proj);
    let before = std::fs::read(&gguf).unwrap();
    let (code, _, _) = run(&["export-gguf", "--model", s(&out), "--out", s(&gguf)]);
    assert_eq!(code, 1);
    let (code, _, _) = run(&[
        "export-gguf",
        "--model",
        s(&out),
        "--dtype",
        "q4_0",
        "--out",
        s(&dir.join("q.gguf")),
    ]);
    assert_eq!(code, 2);
    assert_eq!(std::fs::read(&gguf).unwrap(), before);
    assert!(!dir.join("q.gguf").exists());
    std::fs::remove_dir_all(dir).ok();
}

/// `serve`: ready line on stdout, answers over HTTP, stops cleanly on SIGTERM; bad arguments
/// get the usage exit code before anything loads.
#[test]
fn serve_answers_and_stops_on_sigterm() {
    use std::io::BufRead;
    let dir = crate::serve::tiny_decoder_dir("cli");
    let adapter = dir.join("a.safetensors");
    let model: kron_adapters::model::LlamaForCausalLM<crate::common::TB> =
        kron_adapters::model::llama::load(
            &dir,
            &kron_adapters::PlacementConfig::new(),
            &crate::common::device(),
        )
        .unwrap();
    crate::multi::adapters_for(&model, &crate::multi::every_method()[2].1)
        .write(&adapter)
        .unwrap();
    let mut child = bin()
        .args([
            "serve",
            "--model",
            s(&dir),
            "--adapter",
            &format!("a={}", s(&adapter)),
            "--addr",
            "127.0.0.1:0",
            "--window-ms",
            "1500",
            "--batching",
            "per-adapter",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr: std::net::SocketAddr = line
        .trim()
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("{line:?}"))
        .parse()
        .unwrap();
    let (st, v) = crate::serve::post(
        addr,
        "/v1/generate",
        serde_json::json!({"prompt": "t3 t4", "adapter": "a", "max_new_tokens": 3}),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(crate::serve::http(addr, "GET", "/health", b"").0, 200);
    // A request still in its batching window when SIGTERM arrives is answered before the
    // server exits.
    let in_flight = std::thread::spawn(move || {
        crate::serve::post(
            addr,
            "/v1/generate",
            serde_json::json!({"prompt": "t5", "adapter": "a", "max_new_tokens": 2}),
        )
    });
    std::thread::sleep(std::time::Duration::from_millis(500));
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let (st, v) = in_flight.join().unwrap();
    assert_eq!(st, 200, "{v}");
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("stopped"));
    // An unknown batching mode is a usage error naming the choices.
    let out = bin()
        .args(["serve", "--model", s(&dir), "--batching", "fastest"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("per-adapter"));

    let twice = format!("a={}", s(&adapter));
    let cases: [(&[&str], i32); 7] = [
        (&["serve", "--model", s(&dir), "--addr", "nonsense"], 2),
        (
            &[
                "serve",
                "--model",
                s(&dir),
                "--adapter",
                &twice,
                "--adapter",
                &twice,
            ],
            2,
        ),
        (
            &["serve", "--model", s(&dir), "--adapter", "no-equals-sign"],
            2,
        ),
        (&["serve", "--model", s(&dir), "--max-batch", "0"], 2),
        (&["serve", "--model", s(&dir), "--window-ms", "60001"], 2),
        (&["serve", "--model", "/no/such/model"], 1),
        (
            &[
                "serve",
                "--model",
                s(&dir),
                "--addr",
                "127.0.0.1:0",
                "--adapter",
                &format!("b={}", s(&dir.join("config.json"))),
            ],
            3,
        ),
    ];
    for (args, code) in cases {
        let (c, _, err) = run(args);
        assert_eq!(c, code, "{args:?}: {err}");
        assert!(err.contains("error"), "{err}");
    }
}

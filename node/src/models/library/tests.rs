use super::*;

fn gguf(dir: &Path, file: &str, body: &[u8]) -> PathBuf {
    let path = dir.join(file);
    fs::write(&path, [b"GGUF".as_slice(), body].concat()).unwrap();
    path
}

fn bert_dir(dir: &Path, weights: &[u8]) -> PathBuf {
    let model = dir.join("my-minilm");
    fs::create_dir_all(&model).unwrap();
    fs::write(model.join("model.safetensors"), weights).unwrap();
    fs::write(model.join("config.json"), b"{}").unwrap();
    fs::write(model.join("tokenizer.json"), b"{\"t\":1}").unwrap();
    model
}

#[test]
fn a_gguf_file_is_linked_hashed_recorded_and_found_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let models = tmp.path().join("models");
    let data: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
    let src = gguf(tmp.path(), "Tiny-Model.Q4_0.gguf", &data);
    let (entry, placed) = add(&models, &src, None).unwrap();
    assert_eq!(placed, Placed::Linked, "same file system: no copy");
    assert_eq!(entry.name, "tiny-model.q4_0");
    assert_eq!(entry.format, Format::Gguf);
    let blob = crate::blobs::hash_file(&src).unwrap();
    assert_eq!(entry.files[0].sha256, blob.sha256);
    assert_eq!(entry.files[0].blob_root, blob.root_hex());
    assert_eq!(entry.files[0].bytes, data.len() as u64 + 4);
    assert_eq!(
        entry.source,
        Source::Local {
            path: src.canonicalize().unwrap()
        }
    );
    let path = entry.entry_path(&models);
    assert_eq!(
        path,
        models.join("tiny-model.q4_0").join("Tiny-Model.Q4_0.gguf")
    );
    assert_eq!(
        read(&models, "tiny-model.q4_0").unwrap(),
        Some(entry.clone())
    );
    assert!(list(&models).contains(&entry));
    entry.verify(&models).unwrap();
    // Nothing is left staged.
    let staged: Vec<_> = fs::read_dir(&models)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(".adding-"))
        .collect();
    assert!(staged.is_empty(), "{staged:?}");
}

#[test]
fn adding_the_same_file_again_is_a_no_op_and_other_files_under_its_name_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let models = tmp.path().join("models");
    let src = gguf(tmp.path(), "a.gguf", b"one");
    let (first, _) = add(&models, &src, Some("mine")).unwrap();
    let (again, placed) = add(&models, &src, Some("mine")).unwrap();
    assert_eq!((placed, again), (Placed::AlreadyThere, first.clone()));
    let other = gguf(tmp.path(), "b.gguf", b"two");
    let err = add(&models, &other, Some("mine")).unwrap_err().to_string();
    assert!(err.contains("other files as mine"), "{err}");
    assert_eq!(read(&models, "mine").unwrap(), Some(first));
}

#[test]
fn what_is_not_a_model_is_refused_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let models = tmp.path().join("models");
    let text = tmp.path().join("notes.gguf");
    fs::write(&text, b"hello").unwrap();
    let err = add(&models, &text, None).unwrap_err().to_string();
    assert!(err.contains("not a GGUF file"), "{err}");
    let dir = tmp.path().join("half");
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("config.json"), b"{}").unwrap();
    let err = add(&models, &dir, None).unwrap_err().to_string();
    assert!(
        err.contains("lacks model.safetensors, tokenizer.json"),
        "{err}"
    );
    let err = add(&models, &tmp.path().join("absent.gguf"), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("absent.gguf"), "{err}");
    let src = gguf(tmp.path(), "x.gguf", b"");
    for bad in ["../up", ".hidden", "a/b", ""] {
        assert!(add(&models, &src, Some(bad)).is_err(), "{bad:?} accepted");
    }
    assert!(!models.join("up").exists());
}

#[test]
fn a_known_models_name_takes_only_its_pinned_files() {
    let tmp = tempfile::tempdir().unwrap();
    let models = tmp.path().join("models");
    let src = gguf(tmp.path(), "fake.gguf", b"not smollm2");
    let err = add(&models, &src, Some("smollm2-135m-instruct"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("known model"), "{err}");
    assert!(!models.join("smollm2-135m-instruct").exists());
}

#[test]
fn a_bert_directory_is_added_weights_first() {
    let tmp = tempfile::tempdir().unwrap();
    let models = tmp.path().join("models");
    let src = bert_dir(tmp.path(), b"weights");
    let (entry, _) = add(&models, &src, None).unwrap();
    assert_eq!(
        (entry.name.as_str(), entry.format),
        ("my-minilm", Format::Bert)
    );
    let names: Vec<&str> = entry.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        ["model.safetensors", "config.json", "tokenizer.json"]
    );
    assert_eq!(entry.entry_path(&models), models.join("my-minilm"));
    assert_eq!(
        fs::read(models.join("my-minilm/tokenizer.json")).unwrap(),
        b"{\"t\":1}"
    );
}

#[test]
fn a_changed_file_fails_verification_with_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let models = tmp.path().join("models");
    let src = gguf(tmp.path(), "m.gguf", b"abc");
    let (entry, _) = add(&models, &src, None).unwrap();
    // The cache holds a hard link: changing the original changes the cached file.
    fs::write(&src, b"GGUFabd").unwrap();
    let err = entry.verify(&models).unwrap_err();
    assert!(err.contains("add or pull it again"), "{err}");
}

#[test]
fn a_known_model_fetched_before_records_is_listed_from_its_pins() {
    let tmp = tempfile::tempdir().unwrap();
    let known = find_known("smollm2-135m-instruct").unwrap();
    assert_eq!(read(tmp.path(), known.name).unwrap(), None, "not fetched");
    let dir = super::super::model_dir(tmp.path(), known);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(known.files[0].name), b"x").unwrap();
    let entry = read(tmp.path(), known.name).unwrap().unwrap();
    assert_eq!(entry, known_entry(known));
    assert_eq!(entry.files[0].blob_root, known.files[0].blob_root);
    assert!(matches!(entry.source, Source::Registry { .. }));
}

#[test]
fn names_are_made_safe_and_checked() {
    assert_eq!(safe_name("Org/Model:Q4"), "org_model_q4");
    assert_eq!(safe_name("..x"), "x");
    assert_eq!(safe_name(""), "model");
    assert_eq!(safe_name(&"a".repeat(100)).len(), 64);
    assert!(validate_name("mine-1.2_x").is_ok());
    assert!(validate_name(&"a".repeat(65)).is_err());
}

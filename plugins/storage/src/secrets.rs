//! The custodia store of secret models (`HostCreds`), as the original's
//! keeps them: `/secrets/<container>/<primary key>` holding the model's
//! JSON. No notifications: the original sends none for secrets.

use serde_json::Value;

use crate::custodia::{Answer, CustodiaClient};
use crate::deadline::Deadline;
use crate::error::StorageError;
use crate::models::Model;

/// The key container of the secret classes (`_key_container`).
fn container(model: &Model) -> &'static str {
    match model.class.name {
        "HostCreds" => "hosts",
        // `SecretModel` itself: the original formats `None`.
        _ => "None",
    }
}

fn paths(model: &Model) -> Result<(String, String), StorageError> {
    let container = format!("/secrets/{}/", container(model));
    let key = format!("{container}{}", model.store_key()?.unwrap_or_default());
    Ok((container, key))
}

async fn call(
    custodia: &CustodiaClient,
    method: &str,
    path: &str,
    body: Option<(&str, &[u8])>,
    accept: Option<&str>,
    deadline: Deadline,
) -> Result<Answer, StorageError> {
    custodia
        .call(method, path, body, accept, deadline)
        .await
        .map_err(|e| StorageError::CustodiaDown(e.to_string()))
}

fn http_error(custodia: &CustodiaClient, path: &str, answer: &Answer) -> StorageError {
    StorageError::CustodiaHttp {
        status: answer.status,
        reason: answer.reason.clone(),
        url: custodia.url(path),
    }
}

/// A 404 as the original's lookup error, any other error as itself.
fn not_found_is_lookup(
    custodia: &CustodiaClient,
    path: &str,
    answer: &Answer,
    model: &Model,
) -> StorageError {
    let e = http_error(custodia, path, answer);
    if answer.status == 404 {
        StorageError::Lookup {
            message: e.to_string(),
            class: model.class.name,
            model_safe: model.to_dict_safe(),
        }
    } else {
        e
    }
}

fn ok(answer: &Answer) -> bool {
    (200..300).contains(&answer.status)
}

/// Makes the key container (custodia answers 409 when it exists), then
/// writes the model. Each call is bounded by
/// the request's `deadline` too.
pub async fn save(
    custodia: &CustodiaClient,
    model: &Model,
    deadline: Deadline,
) -> Result<(), StorageError> {
    let (container, key) = paths(model)?;
    let made = call(custodia, "POST", &container, None, None, deadline).await?;
    if !ok(&made) && made.status != 409 {
        return Err(http_error(custodia, &container, &made));
    }
    let json = model.to_json();
    let put = call(
        custodia,
        "PUT",
        &key,
        Some(("application/octet-stream", json.as_bytes())),
        None,
        deadline,
    )
    .await?;
    if !ok(&put) {
        return Err(http_error(custodia, &key, &put));
    }
    Ok(())
}

/// Reads the model.
pub async fn get(
    custodia: &CustodiaClient,
    model: &Model,
    deadline: Deadline,
) -> Result<Model, StorageError> {
    let (_, key) = paths(model)?;
    let got = call(
        custodia,
        "GET",
        &key,
        None,
        Some("application/octet-stream"),
        deadline,
    )
    .await?;
    if !ok(&got) {
        return Err(not_found_is_lookup(custodia, &key, &got, model));
    }
    let value: Value = serde_json::from_slice(&got.body).map_err(StorageError::BadJson)?;
    Model::new(model.class, &value)
}

/// Deletes the model.
pub async fn delete(
    custodia: &CustodiaClient,
    model: &Model,
    deadline: Deadline,
) -> Result<(), StorageError> {
    let (_, key) = paths(model)?;
    let gone = call(custodia, "DELETE", &key, None, None, deadline).await?;
    if !ok(&gone) {
        return Err(not_found_is_lookup(custodia, &key, &gone, model));
    }
    Ok(())
}

//! The end-to-end test binary: real `mesh` processes and real libp2p swarms.

mod auth;
mod blobs;
mod campaigns;
mod cli;
mod console;
mod doctor;
mod embed;
mod engine;
mod gateway;
mod heal;
mod hostile;
mod identity;
mod local;
mod mesh_api;
mod metrics;
mod models;
mod nat;
mod network;
mod ollama;
mod openai;
mod split;
mod upstream;

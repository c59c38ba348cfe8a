// Drives matrix-js-sdk (the SDK behind Element Web) for kith's end-to-end tests.
//
// Protocol: one JSON command per line on stdin, one JSON answer per line on stdout.
//   {"id": 1, "op": "client", "name": "alice", "baseUrl": ..., "idBaseUrl": ...,
//    "userId": ..., "accessToken": ..., "deviceId": ...}
//       creates a MatrixClient the way Element does (homeserver base URL, identity server
//       base URL, and an identity server provider whose getAccessToken answers the
//       token this client registered with the identity server)
//   {"id": 2, "op": "call", "name": "alice", "method": "requestEmailToken", "args": [...]}
//       calls one method of that client; the answer is its result, or the error it threw
//   {"id": 3, "op": "setIdentityToken", "name": "alice", "token": "..."}
//       what the client's identity server provider answers from now on
//   {"id": 4, "op": "takeRequests"}
//       the requests the SDK sent since the last takeRequests (method, URL, body), so the
//       tests can assert what the SDK really puts on the wire
// Answers: {"id": n, "ok": true, "result": ...} or {"id": n, "ok": false, "error": {...}}.
// Only answers go to stdout; the SDK's own logging goes to stderr.

import { createInterface } from "node:readline";

// The SDK's logger binds the console's methods when it is loaded: move them to stderr
// first, then load the SDK.
for (const method of ["log", "info", "debug", "trace", "warn"]) {
    console[method] = console.error;
}
const sdk = await import("matrix-js-sdk");

const clients = new Map();
const identityTokens = new Map();
let requests = [];

async function recordingFetch(input, init = {}) {
    const body = typeof init.body === "string" ? init.body : null;
    requests.push({ method: init.method ?? "GET", url: String(input), body });
    return globalThis.fetch(input, init);
}

function makeClient(command) {
    const name = command.name;
    const client = sdk.createClient({
        baseUrl: command.baseUrl,
        idBaseUrl: command.idBaseUrl,
        userId: command.userId,
        accessToken: command.accessToken,
        deviceId: command.deviceId,
        identityServer: { getAccessToken: async () => identityTokens.get(name) ?? null },
        fetchFn: recordingFetch,
        localTimeoutMs: 30000,
    });
    clients.set(name, client);
    return { userId: client.getUserId(), idServer: client.getIdentityServerUrl(true) };
}

function clientNamed(name) {
    const client = clients.get(name);
    if (!client) throw new Error(`no client named ${name}`);
    return client;
}

async function run(command) {
    switch (command.op) {
        case "client":
            return makeClient(command);
        case "call": {
            const client = clientNamed(command.name);
            if (typeof client[command.method] !== "function") {
                throw new Error(`MatrixClient has no method ${command.method}`);
            }
            const result = await client[command.method](...(command.args ?? []));
            return result === undefined ? null : result;
        }
        case "setIdentityToken":
            clientNamed(command.name);
            identityTokens.set(command.name, command.token);
            return null;
        case "takeRequests": {
            const taken = requests;
            requests = [];
            return taken;
        }
        default:
            throw new Error(`unknown op ${command.op}`);
    }
}

function describe(error) {
    return {
        name: error?.name ?? "Error",
        message: String(error?.message ?? error),
        httpStatus: error?.httpStatus ?? null,
        errcode: error?.errcode ?? null,
        data: error?.data ?? null,
    };
}

function answer(message) {
    process.stdout.write(JSON.stringify(message) + "\n");
}

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
    if (!line.trim()) continue;
    let command;
    try {
        command = JSON.parse(line);
    } catch (error) {
        answer({ id: null, ok: false, error: describe(error) });
        continue;
    }
    try {
        answer({ id: command.id, ok: true, result: await run(command) });
    } catch (error) {
        answer({ id: command.id, ok: false, error: describe(error) });
    }
}
// stdin closed: the test is done with this driver (clients may hold timers open).
process.exit(0);

